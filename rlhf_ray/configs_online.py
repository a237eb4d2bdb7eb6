"""Config trees of the online recipes (ppo, rs, prefs, pipeline), built from the shared parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_ray.config import ConfigError, option, section
from rlhf_ray.configs import (
    CheckpointConfig,
    DataConfig,
    DPOConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    RewardConfig,
    RMConfig,
    RolloutConfig,
    RunConfig,
    SamplingConfig,
    SFTConfig,
)


@dataclass
class KLConfig:
    coef: float = option(0.05, "KL penalty coefficient beta (initial value when adaptive).")
    mode: Literal["reward", "loss"] = option("reward", "Apply KL shaped into the token rewards, or as a loss term.")
    estimator: Literal["k1", "k2", "k3"] = option("k1", "KL estimator (k1 in the reward, k3 as a loss is usual).")
    adaptive: bool = option(False, "Adapt beta toward target (Ziegler et al. controller).")
    target: float = option(6.0, "Target KL per episode for the adaptive controller.")
    horizon: int = option(10000, "Adaptive controller horizon in episodes.")


@dataclass
class PPOConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy to train (usually the SFT model).")
    reference: str | None = option(None, "Frozen reference model (null: the starting policy).")
    value_model: str | None = option(None, "Value model init for gae (null: the policy's backbone).")
    data: DataConfig = option(DataConfig(format="prompt", template="chat"), "Prompts (format: prompt).")
    sampling: SamplingConfig = option(SamplingConfig(n=4), "Sampling; sampling.n is the group size.")
    rollout: RolloutConfig = section(RolloutConfig, "vLLM rollout workers.")
    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "Episode rewards.")
    learner: LearnerConfig = section(LearnerConfig, "DeepSpeed learners.")
    optim: OptimConfig = section(OptimConfig, "Policy optimizer.")
    value_lr: float = option(1e-5, "Value-model learning rate (gae only).")
    value_warmup_steps: int = option(0, "First N steps train only the value model (gae only); the policy waits for a useful critic.")
    advantage: Literal["gae", "grpo", "rloo", "reinforce++"] = option("grpo", "Advantage estimator; gae trains a value model.")
    steps: int = option(10, "Policy versions to train (one rollout batch each).")
    prompts_per_step: int = option(8, "Prompts per rollout batch (episodes = prompts * sampling.n).")
    ppo_epochs: int = option(1, "Passes over each rollout batch.")
    mini_batches: int = option(1, "Optimizer steps per pass (the batch is split into this many).")
    clip_eps: float = option(0.2, "PPO ratio clip.")
    clip_eps_high: float | None = option(None, "Upper ratio clip (null: clip_eps).")
    dual_clip: float | None = option(None, "Dual-clip constant c > 1 for negative advantages (null: off).")
    value_clip_eps: float | None = option(0.2, "Value clip around the old values (null: off).")
    gamma: float = option(1.0, "Discount.")
    lam: float = option(0.95, "GAE lambda.")
    kl: KLConfig = section(KLConfig, "KL penalty against the frozen reference.")
    max_staleness: int = option(0, "Policy versions generation may run ahead of training (0: on-policy).")
    chunk_size: int = option(4, "Prompts per generate call; finished chunks are scored while others generate.")
    eval_every: int = option(0, "Held-out evaluation every N steps (0: only first and last).")
    eval_prompts: int = option(32, "Held-out prompts per evaluation (greedy).")
    eval_samples: int = option(0, "Samples per held-out prompt for eval/score_sampled (0: sampling.n).")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    ray: RayConfig = section(RayConfig, "Ray cluster connection.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")

    def validate(self) -> None:
        if self.advantage in ("grpo", "rloo") and self.sampling.n < 2:
            raise ConfigError(f"advantage={self.advantage} needs sampling.n >= 2 (a group per prompt), "
                              f"got {self.sampling.n}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness: expected >= 0, got {self.max_staleness}")
        if self.prompts_per_step < 1 or self.steps < 1 or self.chunk_size < 1:
            raise ConfigError("steps, prompts_per_step and chunk_size must be at least 1")
        if not (self.reward.model or self.reward.function):
            raise ConfigError("reward: set reward.model, reward.function or both")
        if self.value_warmup_steps and self.advantage != "gae":
            raise ConfigError(f"value_warmup_steps: only advantage=gae has a value model, "
                              f"got advantage={self.advantage}")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples: expected >= 0 (0: sampling.n), got {self.eval_samples}")
        if not 0 <= self.value_warmup_steps < self.steps:
            raise ConfigError(f"value_warmup_steps: expected 0 <= value_warmup_steps < steps={self.steps}, "
                              f"got {self.value_warmup_steps}")


@dataclass
class RSConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy to improve (usually the SFT model).")
    data: DataConfig = option(DataConfig(format="prompt", template="chat"), "Prompts (format: prompt).")
    sampling: SamplingConfig = option(SamplingConfig(n=4), "Sampling; sampling.n responses per prompt.")
    rollout: RolloutConfig = section(RolloutConfig, "vLLM rollout workers.")
    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "Scores the n samples.")
    learner: LearnerConfig = section(LearnerConfig, "DeepSpeed learners (SFT on the kept set).")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    rounds: int = option(2, "Rounds of sample -> keep best -> fine-tune -> sync.")
    prompts_per_round: int = option(32, "Prompts sampled each round.")
    threshold: float | None = option(None, "Keep a prompt's best response only if it scores at least this (null: always).")
    epochs: int = option(1, "SFT passes over each round's kept set.")
    batch_size: int = option(16, "Sequences per optimizer step.")
    eval_prompts: int = option(32, "Held-out prompts per evaluation (greedy).")
    eval_samples: int = option(0, "Samples per held-out prompt for eval/score_sampled (0: sampling.n).")
    ray: RayConfig = section(RayConfig, "Ray cluster connection.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")

    def validate(self) -> None:
        if self.sampling.n < 2:
            raise ConfigError(f"sampling.n: rejection sampling needs at least 2 samples per prompt, got {self.sampling.n}")
        if self.rounds < 1 or self.prompts_per_round < 1 or self.batch_size < 1:
            raise ConfigError("rounds, prompts_per_round and batch_size must be at least 1")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples: expected >= 0 (0: sampling.n), got {self.eval_samples}")


@dataclass
class PrefsConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy that writes the candidate responses.")
    data: DataConfig = option(DataConfig(format="prompt", template="chat"), "Prompts, or preference rows for judge=labels.")
    sampling: SamplingConfig = option(SamplingConfig(n=4), "sampling.n candidates per prompt.")
    rollout: RolloutConfig = section(RolloutConfig, "vLLM rollout workers.")
    judge: Literal["reward", "labels"] = option("reward", "reward: the RewardServer picks best/worst; labels: pairs already on disk.")
    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "The judge (reward function and/or model).")
    split: Literal["train", "heldout", "all"] = option("train", "Which split of the prompts to use.")
    min_margin: float = option(0.0, "Skip a prompt unless best - worst score exceeds this (ties never make pairs).")
    ray: RayConfig = section(RayConfig, "Ray cluster connection.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")

    def validate(self) -> None:
        if self.judge == "reward" and self.sampling.n < 2:
            raise ConfigError(f"sampling.n: a judge needs at least 2 candidates per prompt, got {self.sampling.n}")
        if self.judge == "labels" and self.data.format != "preference":
            raise ConfigError("judge=labels reads existing pairs: set data.format=preference")


STAGES = ("sft", "prefs", "rm", "rs", "ppo", "dpo")


@dataclass
class PipelineConfig(RunConfig):
    """SFT -> prefs -> RM -> RS -> PPO, with a DPO branch from the SFT model, on one Ray."""

    model: ModelConfig = section(ModelConfig, "The pretrained model the pipeline starts from.")
    stages: list[str] = option(list(STAGES), "Stages to run, in pipeline order (a subset of sft prefs rm rs ppo dpo).")
    eval_data: DataConfig = option(DataConfig(format="prompt", template="alpaca"), "Held-out task prompts every stage's model is scored on.")
    eval_checker: str = option("arithmetic", "Exact-answer checker that scores the held-out task.")
    eval_prompts: int = option(64, "Held-out prompts in the final comparison.")
    eval_max_new_tokens: int = option(48, "Greedy tokens per held-out answer.")
    sft: SFTConfig = section(SFTConfig, "Stage 1: supervised fine-tuning (from model).")
    prefs: PrefsConfig = section(PrefsConfig, "Stage 2: preference pairs written by the SFT model.")
    rm: RMConfig = section(RMConfig, "Stage 3: reward model on the pairs (initialised from the SFT model).")
    rs: RSConfig = section(RSConfig, "Stage 4: rejection sampling from the SFT model, scored by the RM.")
    ppo: PPOConfig = section(PPOConfig, "Stage 5: PPO from the RS model, reference = SFT, reward = RM.")
    dpo: DPOConfig = section(DPOConfig, "Branch: DPO from the SFT model on the same pairs.")
    ray: RayConfig = section(RayConfig, "Ray cluster connection (shared by every stage).")
    logging: LoggingConfig = section(LoggingConfig, "Logging (applied to every stage).")

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown}; choices: {', '.join(STAGES)}")
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            raise ConfigError(f"stages: must follow the pipeline order {', '.join(STAGES)}; got {self.stages}")
