"""Gradient invariance of loss aggregation under micro-batching and data parallelism.

With the global normaliser (total response tokens for ``token_mean``, total sequences for
``seq_mean``) the micro-batch losses sum to the full-batch loss, so accumulating gradients
over micro-batches - or averaging gradients over data-parallel ranks that scale their loss by
``world_size`` - reproduces the full-batch gradient exactly. A tiny embedding + linear model
produces the logits so that there are real parameter gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.losses import (
    kl_penalty_loss,
    ppo_policy_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)

DT = torch.float64
VOCAB, HIDDEN, T = 11, 8, 10
Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch, str, torch.Tensor, int], torch.Tensor]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, VOCAB)
    ).to(DT)


def make_batch(prompt_lens: list[int], response_lens: list[int], seed: int) -> Batch:
    """Prompt + response + right padding; loss_mask marks response tokens (targets)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    pos = torch.arange(T)[None, :]
    p = torch.tensor(prompt_lens)[:, None]
    r = torch.tensor(response_lens)[:, None]
    loss_mask = (pos >= p) & (pos < p + r)
    shape = (B, T - 1)
    return {
        "input_ids": ids,
        "loss_mask": loss_mask,
        "old_logprobs": -2.5 + 0.8 * torch.randn(shape, generator=gen, dtype=DT),
        "ref_logprobs": -2.5 + 0.8 * torch.randn(shape, generator=gen, dtype=DT),
        "advantages": torch.randn(shape, generator=gen, dtype=DT),
        "returns": torch.randn(shape, generator=gen, dtype=DT),
        "old_values": torch.randn(shape, generator=gen, dtype=DT),
    }


def rows(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def _sft(model, b, agg, num_tokens, num_seqs):  # type: ignore[no-untyped-def]
    logits = model(b["input_ids"])
    return sft_loss(logits, b["input_ids"], b["loss_mask"], agg, num_tokens, num_seqs)


def _ppo(model, b, agg, num_tokens, num_seqs):  # type: ignore[no-untyped-def]
    logprobs = token_logprobs(model(b["input_ids"]), b["input_ids"])
    loss, _ = ppo_policy_loss(
        logprobs,
        b["old_logprobs"],
        b["advantages"],
        b["loss_mask"][:, 1:],
        clip_eps=0.2,
        dual_clip=3.0,
        aggregation=agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )
    return loss


def _value(model, b, agg, num_tokens, num_seqs):  # type: ignore[no-untyped-def]
    values = model(b["input_ids"])[:, :-1, 0]  # first logit as a stand-in value head
    loss, _ = value_loss(
        values, b["old_values"], b["returns"], b["loss_mask"][:, 1:], 0.2, agg, num_tokens, num_seqs
    )
    return loss


def _kl(model, b, agg, num_tokens, num_seqs):  # type: ignore[no-untyped-def]
    logprobs = token_logprobs(model(b["input_ids"]), b["input_ids"])
    return kl_penalty_loss(
        logprobs, b["ref_logprobs"], b["loss_mask"][:, 1:], "k3", agg, num_tokens, num_seqs
    )


LOSSES: dict[str, LossFn] = {"sft": _sft, "ppo": _ppo, "value": _value, "kl": _kl}


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def full_batch_grad(model: torch.nn.Module, fn: LossFn, batch: Batch, agg: str) -> torch.Tensor:
    model.zero_grad()
    fn(model, batch, agg, None, None).backward()  # local normaliser == global for one batch
    return flat_grad(model)


def accumulated_grad(
    model: torch.nn.Module,
    fn: LossFn,
    batch: Batch,
    agg: str,
    sizes: list[int],
    global_norm: bool = True,
) -> torch.Tensor:
    """Gradient accumulation over micro-batches of the given sizes."""
    num_tokens = batch["loss_mask"][:, 1:].sum()
    num_seqs = batch["input_ids"].shape[0]
    model.zero_grad()
    start = 0
    for size in sizes:
        micro = rows(batch, start, start + size)
        if global_norm:
            loss = fn(model, micro, agg, num_tokens, num_seqs)
        else:  # the common bug: local mean, averaged over micro-batches
            loss = fn(model, micro, agg, None, None) / len(sizes)
        loss.backward()
        start += size
    return flat_grad(model)


def data_parallel_grad(
    model: torch.nn.Module, fn: LossFn, batch: Batch, agg: str, world_size: int
) -> torch.Tensor:
    """Simulated DDP: each rank backprops world_size * loss(shard); gradients are averaged."""
    num_tokens = batch["loss_mask"][:, 1:].sum()
    num_seqs = batch["input_ids"].shape[0]
    shard = num_seqs // world_size
    grads = []
    for rank in range(world_size):
        model.zero_grad()
        local = rows(batch, rank * shard, (rank + 1) * shard)
        (world_size * fn(model, local, agg, num_tokens, num_seqs)).backward()
        grads.append(flat_grad(model).clone())
    return torch.stack(grads).mean(0)  # all-reduce average


PROMPTS = [2, 1, 3, 1, 4, 2]
RESPONSES = [7, 2, 5, 1, 3, 6]  # ragged; padding after each response


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_micro_batch_accumulation_equals_full_batch(loss_name: str, agg: str) -> None:
    model = tiny_model()
    batch = make_batch(PROMPTS, RESPONSES, seed=1)
    fn = LOSSES[loss_name]
    full = full_batch_grad(model, fn, batch, agg)
    assert full.abs().max() > 1e-3  # a real gradient
    for sizes in ([1, 1, 1, 1, 1, 1], [2, 4], [3, 3], [5, 1]):
        torch.testing.assert_close(accumulated_grad(model, fn, batch, agg, sizes), full)


@pytest.mark.parametrize("loss_name", ["sft", "ppo"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_local_normaliser_breaks_invariance(loss_name: str, agg: str) -> None:
    """Negative control: without the global normaliser the gradients differ."""
    model = tiny_model()
    batch = make_batch(PROMPTS, RESPONSES, seed=1)
    fn = LOSSES[loss_name]
    full = full_batch_grad(model, fn, batch, agg)
    if agg == "token_mean":  # token counts per micro-batch differ: 9 vs 15
        wrong = accumulated_grad(model, fn, batch, agg, [2, 4], global_norm=False)
    else:  # seq_mean with unequal micro-batch sizes weights sequences unequally
        wrong = accumulated_grad(model, fn, batch, agg, [1, 5], global_norm=False)
    assert not torch.allclose(wrong, full, atol=1e-6)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_two_data_parallel_ranks_equal_full_batch(loss_name: str, agg: str) -> None:
    model = tiny_model()
    batch = make_batch(PROMPTS, RESPONSES, seed=2)
    fn = LOSSES[loss_name]
    full = full_batch_grad(model, fn, batch, agg)
    torch.testing.assert_close(data_parallel_grad(model, fn, batch, agg, world_size=2), full)
    torch.testing.assert_close(data_parallel_grad(model, fn, batch, agg, world_size=3), full)


@st.composite
def batches_and_splits(draw):  # type: ignore[no-untyped-def]
    B = draw(st.integers(2, 6))
    prompts = draw(st.lists(st.integers(1, 4), min_size=B, max_size=B))
    responses = [draw(st.integers(1, T - p)) for p in prompts]
    cuts = sorted(draw(st.sets(st.integers(1, B - 1), max_size=B - 1)))
    bounds = [0, *cuts, B]
    sizes = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    return prompts, responses, sizes, draw(st.integers(0, 2**16))


MODEL = tiny_model(seed=3)


@settings(max_examples=30, deadline=None)
@given(
    case=batches_and_splits(),
    agg=st.sampled_from(["token_mean", "seq_mean"]),
    loss_name=st.sampled_from(sorted(LOSSES)),
)
def test_random_splits_property(case, agg, loss_name) -> None:  # type: ignore[no-untyped-def]
    prompts, responses, sizes, seed = case
    batch = make_batch(prompts, responses, seed)
    fn = LOSSES[loss_name]
    full = full_batch_grad(MODEL, fn, batch, agg)
    torch.testing.assert_close(accumulated_grad(MODEL, fn, batch, agg, sizes), full)
    # the summed micro-batch losses equal the full-batch loss as values too
    num_tokens = batch["loss_mask"][:, 1:].sum()
    with torch.no_grad():
        total = sum(
            fn(MODEL, rows(batch, s, s + n), agg, num_tokens, len(prompts))
            for s, n in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes)
        )
        torch.testing.assert_close(total, fn(MODEL, batch, agg, None, None))
