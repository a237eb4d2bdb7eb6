"""rlhf-ray: distributed RLHF (SFT, reward models, PPO, rejection sampling, DPO) on Ray."""

__version__ = "0.1.0"
