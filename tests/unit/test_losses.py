"""Unit tests for rlhf_ray.losses against naive per-sample loops and known values."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.losses import (
    aggregate,
    dpo_loss,
    entropy_from_logits,
    kl_penalty_loss,
    masked_entropy,
    masked_mean,
    masked_sum,
    pairwise_reward_loss,
    ppo_policy_loss,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
    value_loss,
)

LN2 = math.log(2.0)
DT = torch.float64


def ragged_mask(batch: int, length: int, gen: torch.Generator, min_len: int = 1) -> torch.Tensor:
    """(B, A) right-padded bool mask with random lengths in [min_len, A]."""
    lengths = torch.randint(min_len, length + 1, (batch,), generator=gen)
    lengths[0] = length  # one full row
    return torch.arange(length)[None, :] < lengths[:, None]


def holey_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, A) random bool mask with holes; every row keeps at least one token."""
    m = torch.rand(batch, length, generator=gen) < 0.6
    m[:, 0] = True
    return m


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------- reductions


def test_masked_sum_and_mean_match_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=DT)
    mask = holey_mask(5, 7, gen)
    xs, ms = x.tolist(), mask.tolist()
    total = sum(xs[b][t] for b in range(5) for t in range(7) if ms[b][t])
    count = sum(ms[b][t] for b in range(5) for t in range(7))
    assert masked_sum(x, mask).item() == pytest.approx(total)
    assert masked_mean(x, mask).item() == pytest.approx(total / count)
    row_means = [sum(xs[b][t] for t in range(7) if ms[b][t]) / sum(ms[b]) for b in range(5)]
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx(row_means)
    col_sums = [sum(xs[b][t] for b in range(5) if ms[b][t]) for t in range(7)]
    assert masked_sum(x, mask.float(), dim=0).tolist() == pytest.approx(col_sums)


def test_masked_mean_of_empty_mask_is_zero_not_nan() -> None:
    x = torch.randn(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    row = masked_mean(x, mask, dim=-1)
    assert row[1].item() == 0.0
    assert row[0].item() == pytest.approx(x[0, :2].mean().item())


@pytest.mark.parametrize("mask_kind", ["ragged", "holey"])
def test_aggregate_matches_loops(mask_kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 9, generator=gen, dtype=DT)
    mask = ragged_mask(6, 9, gen) if mask_kind == "ragged" else holey_mask(6, 9, gen)
    ls, ms = loss.tolist(), mask.tolist()
    tok_vals = [ls[b][t] for b in range(6) for t in range(9) if ms[b][t]]
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(
        sum(tok_vals) / len(tok_vals)
    )
    seq_means = []
    for b in range(6):
        vals = [ls[b][t] for t in range(9) if ms[b][t]]
        seq_means.append(sum(vals) / len(vals))
    assert aggregate(loss, mask, "seq_mean").item() == pytest.approx(sum(seq_means) / 6)
    # explicit global normalisers
    assert aggregate(loss, mask, "token_mean", num_tokens=100).item() == pytest.approx(
        sum(tok_vals) / 100
    )
    assert aggregate(loss, mask, "seq_mean", num_seqs=10).item() == pytest.approx(
        sum(seq_means) / 10
    )


def test_aggregate_errors() -> None:
    loss = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(loss, torch.ones(2, 3), "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        aggregate(loss, torch.ones(2, 4))


# ---------------------------------------------------------------------------- log-probs / SFT


def naive_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> list[list[float]]:
    lg, ids = logits.tolist(), input_ids.tolist()
    out = []
    for b in range(len(lg)):
        row = []
        for t in range(len(ids[b]) - 1):
            z = lg[b][t]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            row.append(z[ids[b][t + 1]] - lse)
        out.append(row)
    return out


def test_token_logprobs_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 11, generator=gen, dtype=DT) * 3
    ids = torch.randint(0, 11, (3, 6), generator=gen)
    got = token_logprobs(logits, ids)
    assert got.shape == (3, 5)
    expected = naive_token_logprobs(logits, ids)
    for b in range(3):
        assert got[b].tolist() == pytest.approx(expected[b], abs=1e-10)


def test_token_logprobs_bf16_path_upcasts() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 50, generator=gen) * 4
    ids = torch.randint(0, 50, (2, 5), generator=gen)
    half = logits.to(torch.bfloat16)
    got = token_logprobs(half, ids)
    assert got.dtype == torch.float32
    ref = token_logprobs(half.float(), ids)  # same rounded logits, float32 math
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_token_logprobs_gradient_and_entropy() -> None:
    """The hand-written backward against autograd's (gradcheck in float64), the bf16 path's
    gradient against float32 math, and the entropy against its definition."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 6, 13, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    ids = torch.randint(0, 13, (3, 6), generator=gen)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, ids), (logits,))
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    (token_logprobs(logits, ids) * weights).sum().backward()
    z = logits.detach().clone().requires_grad_()
    ref = z[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, z.grad)
    assert logits.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    half = logits.detach().to(torch.bfloat16).requires_grad_()
    (token_logprobs(half, ids) * weights.float()).sum().backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.float(), z.grad.float(), atol=2e-2, rtol=2e-2)
    logprobs, entropy = token_logprobs(logits.detach(), ids, with_entropy=True)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()[:, :-1]))
    torch.testing.assert_close(logprobs, ref.detach())
    assert not entropy.requires_grad


def test_token_logprobs_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long))


def test_sequence_logprobs_sum_and_average() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 8, 7, generator=gen, dtype=DT)
    ids = torch.randint(0, 7, (4, 8), generator=gen)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    starts, ends = [2, 3, 1, 5], [8, 6, 4, 6]  # prompt then response then padding
    for b in range(4):
        mask[b, starts[b] : ends[b]] = True
    per_tok = naive_token_logprobs(logits, ids)
    sums = [sum(per_tok[b][t - 1] for t in range(starts[b], ends[b])) for b in range(4)]
    avgs = [sums[b] / (ends[b] - starts[b]) for b in range(4)]
    assert sequence_logprobs(logits, ids, mask).tolist() == pytest.approx(sums)
    assert sequence_logprobs(logits, ids, mask, average=True).tolist() == pytest.approx(avgs)


def test_sft_loss_token_mean_equals_cross_entropy_with_ignore_index() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 13, generator=gen, dtype=DT)
    ids = torch.randint(0, 13, (3, 7), generator=gen)
    loss_mask = torch.tensor(
        [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool
    )
    labels = ids.masked_fill(~loss_mask, -100)[:, 1:]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 13), labels.reshape(-1), ignore_index=-100
    )
    got = sft_loss(logits, ids, loss_mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_sft_loss_seq_mean_matches_loop() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 7, 13, generator=gen, dtype=DT)
    ids = torch.randint(0, 13, (3, 7), generator=gen)
    loss_mask = torch.tensor(
        [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool
    )
    per_tok = naive_token_logprobs(logits, ids)
    seq = []
    for b in range(3):
        vals = [-per_tok[b][t - 1] for t in range(1, 7) if loss_mask[b, t]]
        seq.append(sum(vals) / len(vals))
    got = sft_loss(logits, ids, loss_mask, aggregation="seq_mean")
    assert got.item() == pytest.approx(sum(seq) / 3)


def test_entropy_from_logits_matches_loop_and_bounds() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 9, generator=gen, dtype=DT) * 2
    got = entropy_from_logits(logits)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].tolist()
            norm = sum(math.exp(v) for v in z)
            p = [math.exp(v) / norm for v in z]
            assert got[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p))
    uniform = entropy_from_logits(torch.zeros(1, 1, 9, dtype=DT))
    assert uniform.item() == pytest.approx(math.log(9))
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    expected = (got[0, 0] + got[0, 2] + got[1, 2]) / 3
    assert masked_entropy(logits, mask).item() == pytest.approx(expected.item())


# ---------------------------------------------------------------------------- reward model


def test_reward_loss_is_ln2_at_equal_rewards() -> None:
    r = torch.randn(8, dtype=DT)
    out = pairwise_reward_loss(r, r.clone())
    assert out.loss.item() == pytest.approx(LN2)
    assert out[0] is out.loss
    assert out.accuracy.item() == 0.0  # strict inequality
    assert out.margin_mean.item() == 0.0


def test_reward_loss_matches_loop_with_and_without_margin() -> None:
    gen = torch.Generator().manual_seed(8)
    rc = torch.randn(10, generator=gen, dtype=DT) * 2
    rr = torch.randn(10, generator=gen, dtype=DT) * 2
    margin = torch.rand(10, generator=gen, dtype=DT)
    c, r, m = rc.tolist(), rr.tolist(), margin.tolist()
    plain = sum(-log_sigmoid(c[i] - r[i]) for i in range(10)) / 10
    with_margin = sum(-log_sigmoid(c[i] - r[i] - m[i]) for i in range(10)) / 10
    out = pairwise_reward_loss(rc, rr)
    assert out.loss.item() == pytest.approx(plain)
    assert pairwise_reward_loss(rc, rr, margin).loss.item() == pytest.approx(with_margin)
    assert pairwise_reward_loss(rc, rr, 0.5).loss.item() == pytest.approx(
        sum(-log_sigmoid(c[i] - r[i] - 0.5) for i in range(10)) / 10
    )
    assert out.accuracy.item() == pytest.approx(sum(c[i] > r[i] for i in range(10)) / 10)
    assert out.chosen_mean.item() == pytest.approx(sum(c) / 10)
    assert out.rejected_mean.item() == pytest.approx(sum(r) / 10)
    assert out.margin_mean.item() == pytest.approx(sum(c[i] - r[i] for i in range(10)) / 10)


def test_reward_loss_gradient_pushes_chosen_up() -> None:
    rc = torch.zeros(4, requires_grad=True)
    rr = torch.zeros(4, requires_grad=True)
    pairwise_reward_loss(rc, rr).loss.backward()
    # d/dr_c of -log sigmoid(r_c - r_r) at 0 = -0.5, averaged over 4 -> -0.125
    torch.testing.assert_close(rc.grad, torch.full((4,), -0.125))
    torch.testing.assert_close(rr.grad, torch.full((4,), 0.125))


# ---------------------------------------------------------------------------- DPO


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    gen = torch.Generator().manual_seed(9)
    pc = torch.randn(6, generator=gen, dtype=DT) - 20
    pr = torch.randn(6, generator=gen, dtype=DT) - 20
    for beta in (0.01, 0.1, 1.0):
        out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta)
        assert out.loss.item() == pytest.approx(LN2)
        assert out[0] is out.loss
        assert out.chosen_rewards.abs().max().item() == 0.0
        assert out.accuracy.item() == 0.0
    # cDPO at h = 0 is also ln 2: both terms are log sigmoid(0)
    assert dpo_loss(pc, pr, pc, pr, label_smoothing=0.2).loss.item() == pytest.approx(LN2)


def naive_dpo(pc, pr, rc, rr, beta, loss_type, eps):  # type: ignore[no-untyped-def]
    losses = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            losses.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("sigmoid", 0.1, 0.1),
        ("sigmoid", 1.0, 0.3),
        ("ipo", 0.1, 0.0),
        ("ipo", 0.5, 0.0),
    ],
)
def test_dpo_matches_loop(loss_type: str, beta: float, eps: float) -> None:
    gen = torch.Generator().manual_seed(10)
    t = [torch.randn(12, generator=gen, dtype=DT) * 3 - 30 for _ in range(4)]
    out = dpo_loss(*t, beta=beta, loss_type=loss_type, label_smoothing=eps)
    pc, pr, rc, rr = (x.tolist() for x in t)
    assert out.loss.item() == pytest.approx(naive_dpo(pc, pr, rc, rr, beta, loss_type, eps))
    for i in range(12):
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]))
        assert out.margins[i].item() == pytest.approx(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])))
    acc = sum((pc[i] - rc[i]) > (pr[i] - rr[i]) for i in range(12)) / 12
    assert out.accuracy.item() == pytest.approx(acc)


def test_dpo_hand_values() -> None:
    one = torch.tensor([1.0], dtype=DT)
    zero = torch.tensor([0.0], dtype=DT)
    # h = 1 - 0 = 1, beta = 1: -log sigmoid(1) = log(1 + e^-1)
    assert dpo_loss(one, zero, zero, zero, beta=1.0).loss.item() == pytest.approx(
        math.log1p(math.exp(-1))
    )
    # IPO at its optimum h = 1/(2 beta) has zero loss
    h = torch.tensor([5.0], dtype=DT)
    assert dpo_loss(h, zero, zero, zero, beta=0.1, loss_type="ipo").loss.item() == pytest.approx(0)


def test_dpo_rewards_are_detached_and_loss_has_grad() -> None:
    pc = torch.randn(3, requires_grad=True)
    pr = torch.randn(3, requires_grad=True)
    out = dpo_loss(pc, pr, torch.randn(3), torch.randn(3))
    assert out.loss.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.margins.requires_grad
    out.loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_errors() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"sigmoid.*ipo"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)


# ---------------------------------------------------------------------------- PPO


def naive_ppo_token(logp: float, old: float, adv: float, lo: float, hi: float, dual):  # type: ignore[no-untyped-def]
    ratio = math.exp(logp - old)
    clipped_ratio = min(max(ratio, 1 - lo), 1 + hi)
    objective = min(ratio * adv, clipped_ratio * adv)  # the PPO-clip objective (maximised)
    loss = -objective
    if dual is not None and adv < 0:
        loss = min(loss, dual * abs(adv))
    return loss, -clipped_ratio * adv > -ratio * adv  # (loss, clipped branch active)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("clip_high,dual", [(None, None), (0.28, None), (None, 3.0), (0.3, 2.0)])
def test_ppo_policy_loss_matches_loop(aggregation: str, clip_high, dual) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(11)
    B, A = 5, 8
    logp = torch.randn(B, A, generator=gen, dtype=DT) * 0.5 - 2
    old = logp + torch.randn(B, A, generator=gen, dtype=DT) * 0.6  # big ratios -> clipping
    adv = torch.randn(B, A, generator=gen, dtype=DT)
    mask = ragged_mask(B, A, gen)
    loss, metrics = ppo_policy_loss(
        logp,
        old,
        adv,
        mask,
        clip_eps=0.2,
        clip_eps_high=clip_high,
        dual_clip=dual,
        aggregation=aggregation,
    )
    hi = 0.2 if clip_high is None else clip_high
    rows, n_tok, n_clip, n_dual, kl_sum, ratio_sum = [], 0, 0, 0, 0.0, 0.0
    for b in range(B):
        vals = []
        for t in range(A):
            if not mask[b, t]:
                continue
            lp, ol, a = logp[b, t].item(), old[b, t].item(), adv[b, t].item()
            tok_loss, clipped = naive_ppo_token(lp, ol, a, 0.2, hi, None)
            capped, _ = naive_ppo_token(lp, ol, a, 0.2, hi, dual)
            vals.append(capped)
            n_tok += 1
            n_clip += clipped
            n_dual += capped < tok_loss
            r = math.exp(lp - ol)
            kl_sum += r - 1 - math.log(r)
            ratio_sum += r
        rows.append(vals)
    if aggregation == "token_mean":
        expected = sum(sum(v) for v in rows) / n_tok
    else:
        expected = sum(sum(v) / len(v) for v in rows) / B
    assert loss.item() == pytest.approx(expected)
    assert metrics["clip_frac"].item() == pytest.approx(n_clip / n_tok)
    assert metrics["dual_clip_frac"].item() == pytest.approx(n_dual / n_tok)
    assert metrics["approx_kl"].item() == pytest.approx(kl_sum / n_tok)
    assert metrics["ratio_mean"].item() == pytest.approx(ratio_sum / n_tok)
    assert n_clip > 0
    if dual is not None:
        assert n_dual > 0


def test_ppo_policy_loss_hand_values() -> None:
    def one(ratio: float, adv: float, **kw):  # type: ignore[no-untyped-def]
        lp = torch.tensor([[math.log(ratio)]], dtype=DT)
        return ppo_policy_loss(
            lp, torch.zeros_like(lp), torch.tensor([[adv]], dtype=DT), torch.ones(1, 1), **kw
        )

    assert one(1.0, 2.0)[0].item() == pytest.approx(-2.0)  # on-policy: -A
    assert one(1.5, 1.0)[0].item() == pytest.approx(-1.2)  # clipped at 1 + eps
    assert one(1.5, 1.0)[1]["clip_frac"].item() == 1.0
    assert one(0.5, 1.0)[0].item() == pytest.approx(-0.5)  # pessimistic: unclipped wins
    assert one(0.5, -1.0)[0].item() == pytest.approx(0.8)  # clipped at 1 - eps
    assert one(5.0, -1.0)[0].item() == pytest.approx(5.0)  # standard PPO: unbounded
    out = one(5.0, -1.0, dual_clip=3.0)
    assert out[0].item() == pytest.approx(3.0)  # dual clip caps at c * |A|
    assert out[1]["dual_clip_frac"].item() == 1.0
    assert one(1.25, 1.0, clip_eps_high=0.28)[0].item() == pytest.approx(-1.25)  # clip-higher
    assert one(1.0, 1.0)[1]["approx_kl"].item() == 0.0


def test_ppo_gradient_is_zero_on_clipped_and_padded_tokens() -> None:
    lp = torch.log(torch.tensor([[1.5, 1.0, 1.0]], dtype=DT)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 5.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = ppo_policy_loss(lp, torch.zeros_like(lp), adv, mask)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0  # clipped
    assert lp.grad[0, 1].item() == pytest.approx(-0.5)  # -A * ratio / 2 tokens
    assert lp.grad[0, 2].item() == 0.0  # padding
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(lp, lp, adv, mask, dual_clip=0.9)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_loop(clip_eps) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(12)
    B, A = 4, 6
    values = torch.randn(B, A, generator=gen, dtype=DT)
    old = values + torch.randn(B, A, generator=gen, dtype=DT) * 0.5
    returns = torch.randn(B, A, generator=gen, dtype=DT)
    mask = ragged_mask(B, A, gen)
    loss, metrics = value_loss(values, old, returns, mask, clip_eps=clip_eps)
    total, n, n_clip = 0.0, 0, 0
    for b in range(B):
        for t in range(A):
            if not mask[b, t]:
                continue
            v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            e1 = (v - r) ** 2
            if clip_eps is None:
                e = e1
            else:
                vc = min(max(v, o - clip_eps), o + clip_eps)
                e = max(e1, (vc - r) ** 2)
                n_clip += (vc - r) ** 2 > e1
            total += 0.5 * e
            n += 1
    assert loss.item() == pytest.approx(total / n)
    assert metrics["value_clip_frac"].item() == pytest.approx(n_clip / n)
    if clip_eps is not None:
        assert n_clip > 0
    assert metrics["values_mean"].item() == pytest.approx(masked_mean(values, mask).item())


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_penalty_loss_matches_loop(estimator: str) -> None:
    gen = torch.Generator().manual_seed(13)
    logp = torch.randn(3, 5, generator=gen, dtype=DT)
    ref = torch.randn(3, 5, generator=gen, dtype=DT)
    mask = ragged_mask(3, 5, gen)
    vals = []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                d = ref[b, t].item() - logp[b, t].item()
                vals.append({"k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[estimator])
    got = kl_penalty_loss(logp, ref, mask, estimator=estimator)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(sum(vals) / len(vals))


def test_k1_is_refused_as_a_kl_loss() -> None:
    """k1's expected gradient is zero (see tests/unit/test_kl_gradients.py): a silent no-op."""
    x = torch.zeros(1, 2, dtype=DT)
    with pytest.raises(ValueError, match="k1 has zero expected gradient"):
        kl_penalty_loss(x, x, torch.ones(1, 2), estimator="k1")


# ---------------------------------------------------------------------------- import purity

FORBIDDEN = ("ray", "vllm", "deepspeed", "transformers")


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("rlhf_ray.losses", FORBIDDEN),
        ("rlhf_ray.advantages", FORBIDDEN),
        ("rlhf_ray.data", ("ray", "vllm", "deepspeed")),
    ],
)
def test_module_imports_no_heavy_stack(module: str, forbidden: tuple[str, ...]) -> None:
    """Import in a fresh interpreter (a package with all its submodules) and list sys.modules."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    code = (
        "import importlib, pkgutil, sys\n"
        f"mod = importlib.import_module({module!r})\n"
        "for info in pkgutil.iter_modules(getattr(mod, '__path__', [])):\n"
        "    importlib.import_module(mod.__name__ + '.' + info.name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{module} imported: {proc.stdout.strip()}"
