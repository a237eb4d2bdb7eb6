"""Cross-check our preference losses against TRL's own implementation.

TRL 1.16 computes the DPO loss inside ``DPOTrainer._compute_loss`` (it needs a model that was
given TRL's fused LM head) and the reward-model loss inside ``RewardTrainer.compute_loss``.
Building real trainers needs tokenizers and datasets, so we create bare instances with
``object.__new__`` and set only the attributes those methods read. The DPO checks run TRL's
real code path end to end on a tiny random Llama: TRL's fused LM head computes the log-probs,
TRL aggregates them and computes the loss, and we compare loss values *and* parameter
gradients with ``sequence_logprobs`` + ``dpo_loss`` on the same model.

cDPO (label smoothing) is no longer part of TRL's ``"sigmoid"`` loss; TRL's ``"aot"`` loss
applies the cDPO formula to sorted log-ratio margins. With equal reference log-probs for chosen
and rejected the reference margins are all 0, sorting only permutes the pairs, and the mean
``"aot"`` loss is exactly the mean cDPO loss - that is what we compare against.

TRL's fused LM head computes log-probs in float32 even for a float64 model, so the DPO
comparisons use float32-level tolerances (``TOL``); ours run in float64.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOTrainer, RewardTrainer  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

from rlhf_ray.losses import (  # noqa: E402
    dpo_loss,
    entropy_from_logits,
    masked_entropy,
    pairwise_reward_loss,
    sequence_logprobs,
    token_logprobs,
)

DT = torch.float64
TOL = {"rtol": 1e-5, "atol": 1e-6}  # TRL's log-prob kernel works in float32
B, T, VOCAB = 3, 9, 32
PROMPTS = [2, 3, 1, 2, 3, 1]  # rows 0..B-1 chosen, B..2B-1 rejected
RESPONSES = [5, 2, 6, 4, 5, 3]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(DT)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model.train()


def pair_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """[chosen; rejected] batch in TRL's layout: prompt + completion + right padding."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(T)[None, :]
    p = torch.tensor(PROMPTS)[:, None]
    r = torch.tensor(RESPONSES)[:, None]
    return {
        "input_ids": torch.randint(1, VOCAB, (2 * B, T), generator=gen),
        "attention_mask": (pos < p + r).long(),
        "completion_mask": ((pos >= p) & (pos < p + r)).long(),
    }


def accelerator_stub() -> SimpleNamespace:
    identity = lambda x: x  # noqa: E731 - single process: gathers are the identity
    return SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity)


def bare_dpo_trainer(
    model: Any, loss_type: str, beta: float, label_smoothing: float = 0.0, ref_model: Any = None
) -> DPOTrainer:
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model,
        ref_model=ref_model,
        accelerator=accelerator_stub(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=ref_model is None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    return trainer


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def our_logps(model: LlamaForCausalLM, batch: dict[str, torch.Tensor], average: bool = False):  # type: ignore[no-untyped-def]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logprobs(logits, batch["input_ids"], batch["completion_mask"], average=average)
    return logps[:B], logps[B:], logits


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_sigmoid_matches_trl(beta: float) -> None:
    model, batch = tiny_llama(), pair_batch()
    ref = -10 + torch.randn(2 * B, dtype=DT, generator=torch.Generator().manual_seed(1))
    trainer = bare_dpo_trainer(model, "sigmoid", beta)
    trl_loss = trainer._compute_loss(
        model, {**batch, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}, False
    )
    trl_grads = grads_of(model, trl_loss)

    pc, pr, logits = our_logps(model, batch)
    ours = dpo_loss(pc, pr, ref[:B], ref[B:], beta=beta)
    torch.testing.assert_close(ours.loss, trl_loss, **TOL)
    torch.testing.assert_close(grads_of(model, ours.loss), trl_grads, **TOL)

    m = trainer._metrics["train"]
    assert ours.chosen_rewards.mean().item() == pytest.approx(m["rewards/chosen"][0], rel=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(m["rewards/rejected"][0], rel=1e-5)
    assert ours.margins.mean().item() == pytest.approx(m["rewards/margins"][0], rel=1e-5, abs=1e-7)
    assert ours.accuracy.item() == pytest.approx(m["rewards/accuracies"][0])
    assert pc.mean().item() == pytest.approx(m["logps/chosen"][0], rel=1e-5)
    # TRL's entropy metric is the token-weighted mean over completion tokens
    shifted_mask = batch["completion_mask"][:, 1:]
    ent = masked_entropy(logits[:, :-1].detach(), shifted_mask)
    assert ent.item() == pytest.approx(m["entropy"][0], rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl_with_length_averaged_logps(beta: float) -> None:
    model, batch = tiny_llama(), pair_batch()
    ref = -10 + torch.randn(2 * B, dtype=DT, generator=torch.Generator().manual_seed(2))
    trainer = bare_dpo_trainer(model, "ipo", beta)
    trl_loss = trainer._compute_loss(
        model, {**batch, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}, False
    )
    trl_grads = grads_of(model, trl_loss)

    # TRL's IPO divides the summed log-ratios by the completion length
    pc, pr, _ = our_logps(model, batch, average=True)
    lengths = batch["completion_mask"].sum(-1).to(DT)
    ours = dpo_loss(
        pc, pr, ref[:B] / lengths[:B], ref[B:] / lengths[B:], beta=beta, loss_type="ipo"
    )
    torch.testing.assert_close(ours.loss, trl_loss, **TOL)
    torch.testing.assert_close(grads_of(model, ours.loss), trl_grads, **TOL)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_label_smoothing_matches_trl(label_smoothing: float) -> None:
    model, batch = tiny_llama(), pair_batch()
    ref_same = -10 + torch.randn(B, dtype=DT, generator=torch.Generator().manual_seed(3))
    trainer = bare_dpo_trainer(model, "aot", 0.5, label_smoothing)
    trl_loss = trainer._compute_loss(
        model, {**batch, "ref_chosen_logps": ref_same, "ref_rejected_logps": ref_same}, False
    )
    trl_grads = grads_of(model, trl_loss)

    pc, pr, _ = our_logps(model, batch)
    ours = dpo_loss(pc, pr, ref_same, ref_same, beta=0.5, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.loss, trl_loss, **TOL)
    torch.testing.assert_close(grads_of(model, ours.loss), trl_grads, **TOL)
    plain = dpo_loss(pc, pr, ref_same, ref_same, beta=0.5)
    assert abs(plain.loss.item() - trl_loss.item()) > 1e-4  # smoothing really changed the loss


def test_dpo_is_ln2_with_identical_reference_model_in_trl() -> None:
    model, batch = tiny_llama(seed=5), pair_batch(seed=5)
    ref_model = tiny_llama(seed=5).eval()
    trainer = bare_dpo_trainer(model, "sigmoid", 0.1, ref_model=ref_model)
    trl_loss = trainer._compute_loss(model, batch, False)
    pc, pr, _ = our_logps(model, batch)
    rc, rr, _ = our_logps(ref_model, batch)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert trl_loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert ours.loss.item() == pytest.approx(math.log(2), abs=1e-9)


class RewardStub(torch.nn.Module):
    """A 'model' whose forward returns learnable per-row scalar rewards as (2B, 1) logits."""

    def __init__(self, rewards: torch.Tensor) -> None:
        super().__init__()
        self.rewards = torch.nn.Parameter(rewards.clone())

    def forward(self, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.rewards[:, None])


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl(with_margin: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    n = 8
    model = RewardStub(torch.randn(2 * n, dtype=DT, generator=gen) * 2).train()
    trainer = object.__new__(RewardTrainer)
    trainer.__dict__.update(
        model=model,
        accelerator=accelerator_stub(),
        args=SimpleNamespace(center_rewards_coefficient=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs: dict[str, torch.Tensor] = {"attention_mask": torch.ones(2 * n, 4, dtype=torch.long)}
    margin = torch.rand(n, dtype=DT, generator=gen)
    if with_margin:
        inputs["margin"] = margin
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)

    ours = pairwise_reward_loss(
        model.rewards[:n], model.rewards[n:], margin if with_margin else None
    )
    torch.testing.assert_close(ours.loss, trl_loss)
    torch.testing.assert_close(grads_of(model, ours.loss), trl_grads)
    m = trainer._metrics["train"]
    assert ours.accuracy.item() == pytest.approx(m["accuracy"][0])
    assert ours.margin_mean.item() == pytest.approx(m["margin"][0])


def test_token_logprobs_and_entropy_match_trl_helpers() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 7, 50, dtype=DT, generator=gen) * 3
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    torch.testing.assert_close(
        token_logprobs(logits, ids), trl_utils.selective_log_softmax(logits[:, :-1], ids[:, 1:])
    )
    torch.testing.assert_close(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits))
