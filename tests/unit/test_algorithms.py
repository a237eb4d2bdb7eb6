"""Unit tests for the GRPO/PPO algorithm surface: loss aggregation modes (Dr. GRPO), group
std normalisation, DAPO dynamic sampling and overlong handling, entropy bonus, GSPO and
REINFORCE++-baseline, each against a naive Python loop (float64, ragged masks)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.advantages import (
    grpo_advantages,
    kept_group_rows,
    masked_whiten,
    overlong_keep_mask,
    overlong_penalty,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlhf_ray.losses import (
    AGGREGATIONS,
    aggregate,
    entropy_bonus_loss,
    gspo_policy_loss,
    ppo_policy_loss,
)

DT = torch.float64
SEQ_MODES = ("seq_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ALL_MODES = ("token_mean", *SEQ_MODES)
NORM_LEN = 12.0


def ragged_mask(batch: int, length: int, gen: torch.Generator, min_len: int = 1) -> torch.Tensor:
    """(B, A) right-padded bool mask with random lengths in [min_len, A], row 0 full."""
    lengths = torch.randint(min_len, length + 1, (batch,), generator=gen)
    lengths[0] = length
    return torch.arange(length)[None, :] < lengths[:, None]


def holey_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, A) random bool mask with holes; every row keeps at least one token."""
    m = torch.rand(batch, length, generator=gen) < 0.6
    m[:, 0] = True
    return m


def make_mask(kind: str, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    return ragged_mask(batch, length, gen) if kind == "ragged" else holey_mask(batch, length, gen)


def naive_aggregate(rows: list[list[float]], mode: str, num_tokens: float | None = None,
                    num_seqs: float | None = None, norm_len: float | None = None) -> float:
    """``rows[b]`` = the per-token losses of sequence b's response tokens (in order)."""
    if mode == "token_mean":
        n = sum(len(r) for r in rows) if num_tokens is None else num_tokens
        return sum(sum(r) for r in rows) / n
    n_seq = len(rows) if num_seqs is None else num_seqs
    if mode in ("seq_mean", "seq_mean_token_mean"):
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / n_seq
    assert mode == "seq_mean_token_sum_norm" and norm_len is not None
    return sum(sum(r) / norm_len for r in rows) / n_seq


def masked_rows(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [[x[b, t].item() for t in range(x.shape[1]) if mask[b, t]] for b in range(x.shape[0])]


# ---------------------------------------------------------------------------- aggregation


def test_aggregations_are_listed() -> None:
    assert set(ALL_MODES) == set(AGGREGATIONS)


@pytest.mark.parametrize("mask_kind", ["ragged", "holey"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_aggregate_modes_match_loops(mode: str, mask_kind: str) -> None:
    gen = torch.Generator().manual_seed(20)
    loss = torch.randn(6, 9, generator=gen, dtype=DT) + 0.3
    mask = make_mask(mask_kind, 6, 9, gen)
    loss = loss.masked_fill(~mask, 1e6)  # padding must not leak in
    rows = masked_rows(loss, mask)
    got = aggregate(loss, mask, mode, norm_len=NORM_LEN)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(naive_aggregate(rows, mode, norm_len=NORM_LEN))
    got = aggregate(loss, mask.float(), mode, num_tokens=100, num_seqs=10,  # type: ignore[arg-type]
                    norm_len=NORM_LEN)
    assert got.item() == pytest.approx(
        naive_aggregate(rows, mode, num_tokens=100, num_seqs=10, norm_len=NORM_LEN))


def test_aggregate_modes_differ_on_ragged_batches() -> None:
    """The three weightings are genuinely different (so the loop tests can tell them apart)."""
    gen = torch.Generator().manual_seed(21)
    loss = torch.rand(5, 8, generator=gen, dtype=DT) + 1.0
    mask = ragged_mask(5, 8, gen, min_len=1)
    mask[1, 2:] = False  # make sure lengths differ
    vals = {m: aggregate(loss, mask, m, norm_len=8.0).item() for m in ALL_MODES}  # type: ignore[arg-type]
    assert vals["seq_mean"] == vals["seq_mean_token_mean"]
    assert len({round(vals[m], 9) for m in ("token_mean", "seq_mean", "seq_mean_token_sum_norm")}) == 3


def test_seq_mean_token_sum_norm_is_token_sum_over_constant() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # (6 / 10 + 4 / 10) / 2
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", norm_len=10).item() == pytest.approx(0.5)
    # seq_mean_token_mean: (2 + 4) / 2
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)


def test_seq_mean_token_sum_norm_needs_norm_len() -> None:
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss, mask, "seq_mean_token_sum_norm", norm_len=0)
    with pytest.raises(ValueError, match="seq_mean_token_sum_norm"):
        aggregate(loss, mask, "seq_sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_micro_batches_sum_to_the_full_batch_loss_and_gradient(mode: str) -> None:
    """Split 9 rows into micro-batches of unequal size, each trimmed to its own padded width,
    normalise with the global counts: the summed losses (and gradients) are the full batch's."""
    gen = torch.Generator().manual_seed(22)
    B, A = 9, 10
    mask = ragged_mask(B, A, gen)
    base = torch.randn(B, A, generator=gen, dtype=DT)
    full_in = base.clone().requires_grad_()
    full = aggregate(full_in ** 2, mask, mode, norm_len=NORM_LEN)  # type: ignore[arg-type]
    full.backward()

    glob = {"num_tokens": mask.sum().item(), "num_seqs": float(B), "norm_len": NORM_LEN}
    split_in = base.clone().requires_grad_()
    total = torch.zeros((), dtype=DT)
    for lo, hi in [(0, 2), (2, 6), (6, 7), (7, 9)]:
        width = int(mask[lo:hi].sum(-1).max())
        mb_loss = split_in[lo:hi, :width] ** 2
        total = total + aggregate(mb_loss, mask[lo:hi, :width], mode, **glob)  # type: ignore[arg-type]
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split_in.grad, full_in.grad)
    # and the local normalisers would NOT give the full-batch loss
    local = sum(aggregate(base[lo:hi] ** 2, mask[lo:hi], mode, norm_len=NORM_LEN).item()  # type: ignore[arg-type]
                for lo, hi in [(0, 2), (2, 6), (6, 7), (7, 9)])
    assert local != pytest.approx(full.item())


def test_ppo_policy_loss_accepts_sum_norm() -> None:
    gen = torch.Generator().manual_seed(23)
    logp = torch.randn(4, 6, generator=gen, dtype=DT) * 0.1
    old = logp + torch.randn(4, 6, generator=gen, dtype=DT) * 0.3
    adv = torch.randn(4, 6, generator=gen, dtype=DT)
    mask = ragged_mask(4, 6, gen)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, aggregation="seq_mean_token_sum_norm",
                              norm_len=7.0)
    rows = []
    for b in range(4):
        row = []
        for t in range(6):
            if mask[b, t]:
                r, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
                row.append(-min(r * a, min(max(r, 0.8), 1.2) * a))
        rows.append(row)
    assert loss.item() == pytest.approx(naive_aggregate(rows, "seq_mean_token_sum_norm", norm_len=7.0))


# ---------------------------------------------------------------------------- group std on/off


def test_grpo_without_std_matches_loop_and_rloo_is_unaffected() -> None:
    gen = torch.Generator().manual_seed(24)
    G = 4
    scores = torch.randn(12, generator=gen, dtype=DT) * 3
    s = scores.tolist()
    no_std = grpo_advantages(scores, G, normalize_std=False)
    with_std = grpo_advantages(scores, G, normalize_std=True)
    for i in range(12):
        grp = s[(i // G) * G: (i // G + 1) * G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        assert no_std[i].item() == pytest.approx(s[i] - mean)
        assert with_std[i].item() == pytest.approx((s[i] - mean) / (std + 1e-6))
    # scaling the scores: the std-normalised advantage is (nearly) invariant; the unnormalised
    # one and RLOO (which never divides by a std) scale with the scores.
    k = 10.0
    torch.testing.assert_close(grpo_advantages(scores * k, G), with_std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grpo_advantages(scores * k, G, normalize_std=False), k * no_std)
    torch.testing.assert_close(rloo_advantages(scores * k, G), k * rloo_advantages(scores, G))
    torch.testing.assert_close(rloo_advantages(scores, G), G / (G - 1) * no_std)


# ---------------------------------------------------------------------------- DAPO dynamic sampling


def test_zero_variance_groups_hand_values() -> None:
    scores = torch.tensor([1, 1, 1, 0, 1, 0, 2, 2 + 1e-9, 2, 0.5, 0.5, 0.7], dtype=DT)
    assert zero_variance_groups(scores, 3).tolist() == [True, False, True, False]
    assert zero_variance_groups(scores, 3, atol=0.0).tolist() == [True, False, False, False]
    assert zero_variance_groups(scores, 3, atol=0.25).tolist() == [True, False, True, True]
    assert zero_variance_groups(scores, 1).all()
    with pytest.raises(ValueError, match="multiple"):
        zero_variance_groups(scores, 5)


def test_zero_variance_groups_and_kept_rows_match_loop() -> None:
    gen = torch.Generator().manual_seed(25)
    G, n_groups = 4, 10
    scores = torch.randint(0, 2, (G * n_groups,), generator=gen).to(DT)  # binary rewards
    scores[:G] = 1.0  # at least one constant group
    scores[G] = 0.0  # and at least one informative one
    s = scores.tolist()
    expected = [len(set(s[g * G:(g + 1) * G])) == 1 for g in range(n_groups)]
    flags = zero_variance_groups(scores, G)
    assert flags.tolist() == expected
    assert any(expected) and not all(expected)
    idx = kept_group_rows(~flags, G)
    expected_rows = [i for i in range(G * n_groups) if not expected[i // G]]
    assert idx.tolist() == expected_rows
    kept = scores[idx]
    # every kept group has a non-zero GRPO advantage somewhere
    assert not zero_variance_groups(kept, G).any()
    assert (grpo_advantages(kept, G).view(-1, G).abs().sum(-1) > 0).all()
    assert kept_group_rows(torch.zeros(3, dtype=torch.bool), G).numel() == 0
    assert kept_group_rows(torch.tensor([False, True, False, True]), 3).tolist() == [3, 4, 5, 9, 10, 11]


# ---------------------------------------------------------------------------- DAPO overlong


def naive_overlong(n: float, L: int, C: int, factor: float) -> float:
    if n <= L - C:
        return 0.0
    if n <= L:
        return factor * ((L - C) - n) / C
    return -factor


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_penalty_known_values_and_loop(factor: float) -> None:
    L, C = 20, 5
    lengths = torch.tensor([0, 3, 14, 15, 16, 17, 19, 20, 21, 100])
    got = overlong_penalty(lengths, L, C, factor)
    assert got.dtype == torch.float32
    expected = [0, 0, 0, 0, -0.2, -0.4, -0.8, -1.0, -1.0, -1.0]
    assert got.tolist() == pytest.approx([factor * e for e in expected])
    fl = torch.tensor([15.0, 17.5, 19.99], dtype=DT)
    got = overlong_penalty(fl, L, C, factor)
    assert got.dtype == DT
    assert got.tolist() == pytest.approx([naive_overlong(n, L, C, factor) for n in fl.tolist()])
    gen = torch.Generator().manual_seed(26)
    rand = torch.randint(0, 30, (50,), generator=gen)
    assert overlong_penalty(rand, L, C, factor).tolist() == pytest.approx(
        [naive_overlong(n, L, C, factor) for n in rand.tolist()])


def test_overlong_penalty_edge_buffers() -> None:
    lengths = torch.tensor([0, 9, 10, 11])
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0, 0.0, 0.0, -1.0]  # hard cliff
    assert overlong_penalty(lengths, 10, 10).tolist() == pytest.approx([0.0, -0.9, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 10, -1)


def test_overlong_keep_mask() -> None:
    assert overlong_keep_mask(["stop", "length", "stop", "abort"]).tolist() == [True, False, True, True]
    assert overlong_keep_mask(torch.tensor([0, 1, 1])).tolist() == [True, False, False]
    assert overlong_keep_mask(torch.tensor([False, True])).tolist() == [True, False]
    with pytest.raises(ValueError):
        overlong_keep_mask(torch.zeros(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------- entropy bonus


def naive_entropy(z: list[float]) -> tuple[float, list[float]]:
    """Entropy of softmax(z) and the probabilities."""
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    p = [v / tot for v in e]
    return -sum(q * math.log(q) for q in p), p


@pytest.mark.parametrize("mode", ALL_MODES)
def test_entropy_bonus_matches_loop_and_has_gradient(mode: str) -> None:
    gen = torch.Generator().manual_seed(27)
    B, A, V = 4, 6, 7
    logits = (torch.randn(B, A, V, generator=gen, dtype=DT) * 2).requires_grad_()
    mask = ragged_mask(B, A, gen)
    glob = {"num_tokens": 30.0, "num_seqs": 5.0, "norm_len": NORM_LEN}
    loss = entropy_bonus_loss(logits, mask, mode, **glob)  # type: ignore[arg-type]
    rows, weights = [], torch.zeros(B, A, dtype=DT)
    expected_grad = torch.zeros(B, A, V, dtype=DT)
    for b in range(B):
        row = []
        n_b = int(mask[b].sum())
        for t in range(A):
            if not mask[b, t]:
                continue
            h, p = naive_entropy(logits[b, t].tolist())
            row.append(h)
            # d loss / d H[b, t] for this aggregation
            w = {"token_mean": -1 / 30.0, "seq_mean": -1 / (n_b * 5.0),
                 "seq_mean_token_mean": -1 / (n_b * 5.0),
                 "seq_mean_token_sum_norm": -1 / (NORM_LEN * 5.0)}[mode]
            weights[b, t] = w
            for k in range(V):  # dH/dz_k = -p_k (log p_k + H)
                expected_grad[b, t, k] = w * -p[k] * (math.log(p[k]) + h)
        rows.append(row)
    assert loss.item() == pytest.approx(-naive_aggregate(rows, mode, **glob))
    assert loss.item() < 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(logits.grad, expected_grad)
    assert (logits.grad[~mask] == 0).all()


def test_entropy_bonus_upcasts_half_and_checks_shapes() -> None:
    gen = torch.Generator().manual_seed(28)
    logits = torch.randn(2, 3, 11, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    half = logits.to(torch.bfloat16)
    got = entropy_bonus_loss(half, mask)
    assert got.dtype == torch.float32
    ref = entropy_bonus_loss(half.float(), mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    # uniform logits: H = log V, loss = -log V
    assert entropy_bonus_loss(torch.zeros(2, 3, 11, dtype=DT), mask).item() == pytest.approx(-math.log(11))
    with pytest.raises(ValueError, match="B, A, V"):
        entropy_bonus_loss(logits, torch.ones(2, 4))


# ---------------------------------------------------------------------------- GSPO


def naive_gspo(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
               lo: float, hi: float, dual: float | None, mode: str, **glob: float
               ) -> tuple[float, float, float, list[float]]:
    """Returns (loss, clip_frac, ratio_mean, sequence ratios) by loops over sequences."""
    B, A = logp.shape
    rows, seq_ratios, n_tok, n_clip, ratio_sum = [], [], 0, 0, 0.0
    for b in range(B):
        idx = [t for t in range(A) if mask[b, t]]
        s = math.exp(sum(logp[b, t].item() - old[b, t].item() for t in idx) / len(idx))
        seq_ratios.append(s)
        cs = min(max(s, 1 - lo), 1 + hi)
        row = []
        for t in idx:
            a = adv[b, t].item()
            loss = -min(s * a, cs * a)
            if dual is not None and a < 0:
                loss = min(loss, dual * abs(a))
            row.append(loss)
            n_tok += 1
            n_clip += -cs * a > -s * a
            ratio_sum += s
        rows.append(row)
    return naive_aggregate(rows, mode, **glob), n_clip / n_tok, ratio_sum / n_tok, seq_ratios


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("dual", [None, 1.5])
@pytest.mark.parametrize("row_constant", [True, False])
def test_gspo_matches_loop_with_clipping(mode: str, dual: float | None, row_constant: bool) -> None:
    gen = torch.Generator().manual_seed(29)
    B, A = 8, 7
    lo, hi = 0.02, 0.03
    mask = ragged_mask(B, A, gen)
    logp = torch.randn(B, A, generator=gen, dtype=DT) * 0.5 - 2
    old = logp + torch.randn(B, A, generator=gen, dtype=DT) * 0.08
    if row_constant:
        adv = torch.randn(B, 1, generator=gen, dtype=DT).expand(B, A).clone()
    else:
        adv = torch.randn(B, A, generator=gen, dtype=DT)
    # garbage on padding must not reach the sequence ratio
    old = old.masked_fill(~mask, 50.0)
    glob = {"num_tokens": 60.0, "num_seqs": 9.0, "norm_len": NORM_LEN}
    loss, metrics = gspo_policy_loss(logp, old, adv, mask, lo, hi, dual, mode, **glob)  # type: ignore[arg-type]
    expected, clip_frac, ratio_mean, seq_ratios = naive_gspo(logp, old, adv, mask, lo, hi, dual, mode,
                                                             **glob)
    assert loss.item() == pytest.approx(expected)
    assert metrics["clip_frac"].item() == pytest.approx(clip_frac)
    assert metrics["ratio_mean"].item() == pytest.approx(ratio_mean)
    assert 0 < clip_frac < 1  # clipping is active on some sequences, not all
    assert any(abs(s - 1) > 0.03 for s in seq_ratios) and any(abs(s - 1) < 0.02 for s in seq_ratios)
    assert set(metrics) == {"clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean"}
    # (B,) advantages are accepted when constant along rows
    if row_constant:
        loss_b, _ = gspo_policy_loss(logp, old, adv[:, 0], mask, lo, hi, dual, mode, **glob)  # type: ignore[arg-type]
        assert loss_b.item() == pytest.approx(expected)


def test_gspo_on_policy_ratio_is_one_and_gradient_is_plain_policy_gradient() -> None:
    gen = torch.Generator().manual_seed(30)
    B, A = 5, 6
    mask = ragged_mask(B, A, gen)
    logp = (torch.randn(B, A, generator=gen, dtype=DT) - 2).requires_grad_()
    adv = torch.randn(B, generator=gen, dtype=DT)
    loss, metrics = gspo_policy_loss(logp, logp.detach().clone(), adv, mask, num_seqs=7.0)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-adv.sum().item() / 7.0)
    loss.backward()
    # plain REINFORCE on the sequence-mean objective: -1/N sum_i A_i * mean_t logp[i, t]
    lengths = mask.sum(-1).to(DT)
    expected = -(adv / lengths / 7.0)[:, None] * mask
    torch.testing.assert_close(logp.grad, expected)
    assert (logp.grad[~mask] == 0).all()


def test_gspo_token_gradient_equals_sequence_level_gspo_gradient() -> None:
    """Off policy, with clipping active: autograd through the sequence-level objective
    ``-1/N sum_i min(s_i A_i, clip(s_i) A_i)`` (s_i with its full gradient) gives the same
    gradient as the GSPO-token loss."""
    gen = torch.Generator().manual_seed(31)
    B, A = 8, 7
    lo, hi = 0.02, 0.03
    mask = holey_mask(B, A, gen)
    base = torch.randn(B, A, generator=gen, dtype=DT) * 0.5 - 2
    old = base + torch.randn(B, A, generator=gen, dtype=DT) * 0.08
    adv = torch.randn(B, generator=gen, dtype=DT)

    logp = base.clone().requires_grad_()
    loss, metrics = gspo_policy_loss(logp, old, adv, mask, lo, hi)
    loss.backward()
    assert 0 < metrics["clip_frac"].item() < 1

    ref_in = base.clone().requires_grad_()
    objective = torch.zeros((), dtype=DT)
    for b in range(B):
        idx = [t for t in range(A) if mask[b, t]]
        s = torch.exp(sum(ref_in[b, t] - old[b, t] for t in idx) / len(idx))
        objective = objective + torch.minimum(s * adv[b], s.clamp(1 - lo, 1 + hi) * adv[b])
    ref_loss = -objective / B
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item())
    torch.testing.assert_close(logp.grad, ref_in.grad)
    assert logp.grad.abs().sum() > 0
    # PPO's token-level ratio gives a different gradient on the same data
    ppo_in = base.clone().requires_grad_()
    ppo_loss, _ = ppo_policy_loss(ppo_in, old, adv[:, None].expand(B, A), mask, lo, hi,
                                  aggregation="seq_mean_token_mean")
    ppo_loss.backward()
    assert not torch.allclose(ppo_in.grad, ref_in.grad)


def test_gspo_micro_batches_sum_to_full_batch() -> None:
    gen = torch.Generator().manual_seed(32)
    B, A = 6, 8
    mask = ragged_mask(B, A, gen)
    logp = torch.randn(B, A, generator=gen, dtype=DT) * 0.5 - 2
    old = logp + torch.randn(B, A, generator=gen, dtype=DT) * 0.05
    adv = torch.randn(B, generator=gen, dtype=DT)
    full, _ = gspo_policy_loss(logp, old, adv, mask, 0.01, 0.02)
    parts = [gspo_policy_loss(logp[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], 0.01, 0.02,
                              num_seqs=float(B))[0].item() for lo, hi in [(0, 1), (1, 4), (4, 6)]]
    assert sum(parts) == pytest.approx(full.item())
    with pytest.raises(ValueError, match="dual_clip"):
        gspo_policy_loss(logp, old, adv, mask, dual_clip=1.0)


# ---------------------------------------------------------------------------- REINFORCE++-baseline


def naive_rpp_baseline(scores: list[float], G: int, mask: torch.Tensor,
                       token_rewards: torch.Tensor | None) -> list[list[float]]:
    B, A = mask.shape
    centred = []
    for i in range(B):
        grp = scores[(i // G) * G:(i // G + 1) * G]
        centred.append(scores[i] - sum(grp) / G)
    x = [[0.0] * A for _ in range(B)]
    for b in range(B):
        for t in range(A):
            if mask[b, t]:
                togo = 0.0
                if token_rewards is not None:
                    togo = sum(token_rewards[b, u].item() for u in range(t, A) if mask[b, u])
                x[b][t] = centred[b] + togo
    vals = [x[b][t] for b in range(B) for t in range(A) if mask[b, t]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    return [[(x[b][t] - mean) / std if mask[b, t] else 0.0 for t in range(A)] for b in range(B)]


@pytest.mark.parametrize("mask_kind", ["ragged", "holey"])
@pytest.mark.parametrize("with_token_rewards", [False, True])
def test_reinforce_pp_baseline_matches_loop(mask_kind: str, with_token_rewards: bool) -> None:
    gen = torch.Generator().manual_seed(33)
    G, B, A = 3, 9, 6
    scores = torch.randn(B, generator=gen, dtype=DT) * 2 + 1
    mask = make_mask(mask_kind, B, A, gen)
    token_rewards = (torch.randn(B, A, generator=gen, dtype=DT) * 0.1
                     if with_token_rewards else None)
    if token_rewards is not None:
        token_rewards = token_rewards.masked_fill(~mask, 1e3)  # padding is ignored
    got = reinforce_pp_baseline_advantages(scores, G, mask, token_rewards)
    expected = naive_rpp_baseline(scores.tolist(), G, mask, token_rewards)
    assert got.shape == (B, A)
    for b in range(B):
        assert got[b].tolist() == pytest.approx(expected[b], abs=1e-10)
    # not the same as whitening the raw scores (the group baseline matters)
    raw = masked_whiten(scores[:, None] * mask, mask)
    assert not torch.allclose(got, raw)


def test_reinforce_pp_baseline_constant_groups_give_zero() -> None:
    scores = torch.tensor([1.0, 1.0, 5.0, 5.0], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    got = reinforce_pp_baseline_advantages(scores, 2, mask)
    assert (got == 0).all()
    # hand value: centred [-1, 1, 0, 0]; tokens [-1, -1, 1, 0, 0, 0, 0]
    scores = torch.tensor([0.0, 2.0, 3.0, 3.0], dtype=DT)
    got = reinforce_pp_baseline_advantages(scores, 2, mask)
    vals = [-1, -1, 1, 0, 0, 0, 0]
    mean = sum(vals) / 7
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 7 + 1e-8)
    assert got[0, 0].item() == pytest.approx((-1 - mean) / std)
    assert got[1, 0].item() == pytest.approx((1 - mean) / std)
    assert got[2, 2].item() == pytest.approx(-mean / std)
    assert got[0, 2].item() == 0.0
