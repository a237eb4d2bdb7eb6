"""Unit and property tests for rlhf_ray.advantages."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.advantages import (
    AdaptiveKLController,
    FixedKLController,
    discounted_returns,
    expand_to_tokens,
    gae,
    grpo_advantages,
    kl_estimate,
    masked_whiten,
    reinforce_pp_returns,
    rloo_advantages,
    shape_rewards_with_kl,
)

DT = torch.float64
PROPS = settings(max_examples=40, deadline=None)


def ragged_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    return torch.arange(length)[None, :] < lengths[:, None]


def naive_gae_row(
    rewards: list[float], values: list[float], mask: list[bool], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Textbook GAE on the compacted list of response tokens, scattered back."""
    idx = [t for t, m in enumerate(mask) if m]
    r = [rewards[t] for t in idx]
    v = [values[t] for t in idx] + [0.0]  # terminal value 0
    adv_c = [0.0] * len(idx)
    running = 0.0
    for k in reversed(range(len(idx))):
        delta = r[k] + gamma * v[k + 1] - v[k]
        running = delta + gamma * lam * running
        adv_c[k] = running
    adv = [0.0] * len(mask)
    ret = [0.0] * len(mask)
    for k, t in enumerate(idx):
        adv[t] = adv_c[k]
        ret[t] = adv_c[k] + v[k]
    return adv, ret


# ---------------------------------------------------------------------------- KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_matches_formula(estimator: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=gen, dtype=DT)
    ref = torch.randn(4, 6, generator=gen, dtype=DT)
    got = kl_estimate(logp, ref, estimator)  # type: ignore[arg-type]
    assert got.shape == (4, 6)
    for b in range(4):
        for t in range(6):
            lp, rf = logp[b, t].item(), ref[b, t].item()
            expected = {
                "k1": lp - rf,
                "k2": 0.5 * (lp - rf) ** 2,
                "k3": math.exp(rf - lp) - (rf - lp) - 1,
            }[estimator]
            assert got[b, t].item() == pytest.approx(expected)
    if estimator != "k1":
        assert (got >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_for_kl(estimator: str) -> None:
    """E_{x~p}[k(x)] equals KL(p || q) exactly when the expectation is taken over the support."""
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(1, 10, generator=gen, dtype=DT), dim=-1)
    logq = torch.log_softmax(torch.randn(1, 10, generator=gen, dtype=DT), dim=-1)
    exact_kl = (logp.exp() * (logp - logq)).sum()
    expectation = (logp.exp() * kl_estimate(logp, logq, estimator)).sum()  # type: ignore[arg-type]
    assert expectation.item() == pytest.approx(exact_kl.item(), rel=1e-10)


def test_kl_estimate_unknown() -> None:
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- reward shaping


def test_shape_rewards_with_kl_matches_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(4, generator=gen, dtype=DT)
    kl = torch.randn(4, 7, generator=gen, dtype=DT)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],  # full
            [1, 1, 1, 0, 0, 0, 0],  # right padded
            [1, 0, 0, 0, 0, 0, 0],  # single token
            [0, 1, 1, 0, 1, 0, 0],  # holes: last response token is index 4
        ],
        dtype=torch.bool,
    )
    got = shape_rewards_with_kl(scores, kl, mask, kl_coef=0.05)
    for b in range(4):
        last = max(t for t in range(7) if mask[b, t])
        for t in range(7):
            expected = -0.05 * kl[b, t].item() if mask[b, t] else 0.0
            if t == last:
                expected += scores[b].item()
            assert got[b, t].item() == pytest.approx(expected)
    # the row sum is score - beta * sum(kl) over the response
    torch.testing.assert_close(got.sum(-1), scores - 0.05 * (kl * mask).sum(-1))


def test_shape_rewards_with_kl_rejects_empty_rows() -> None:
    mask = torch.tensor([[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="at least one"):
        shape_rewards_with_kl(torch.zeros(2), torch.zeros(2, 2), mask, 0.1)


def test_kl_controllers_hand_computed() -> None:
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1

    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # err = clip(0.5) = 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    assert ctl.value == pytest.approx(0.201024)
    ctl2 = AdaptiveKLController(0.2, 6.0, 10000)
    ctl2.update(6.6, 100)  # err = 0.1, inside the clip range
    assert ctl2.value == pytest.approx(0.2 * 1.001)
    ctl3 = AdaptiveKLController(0.2, 6.0, 10000)
    ctl3.update(0.0, 500)  # err = clip(-1) = -0.2
    assert ctl3.value == pytest.approx(0.2 * (1 - 0.2 * 500 / 10000))
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, 0.0, 10)


# ---------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_loop_on_ragged_rows(gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(3)
    B, A = 6, 9
    rewards = torch.randn(B, A, generator=gen, dtype=DT)
    values = torch.randn(B, A, generator=gen, dtype=DT)
    mask = ragged_mask(B, A, gen)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        e_adv, e_ret = naive_gae_row(
            rewards[b].tolist(), values[b].tolist(), mask[b].tolist(), gamma, lam
        )
        assert adv[b].tolist() == pytest.approx(e_adv)
        assert ret[b].tolist() == pytest.approx(e_ret)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.0], [2.0, -1.0, 0.0, 0.0]], dtype=DT)
    values = torch.tensor([[0.3, 0.2, 0.1, 9.0], [1.0, 0.5, 9.0, 9.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    expected_adv = torch.tensor(
        [[1.5 - 0.3, 1.5 - 0.2, 1.0 - 0.1, 0.0], [1.0 - 1.0, -1.0 - 0.5, 0, 0]], dtype=DT
    )
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, torch.tensor([[1.5, 1.5, 1.0, 0], [1.0, -1.0, 0, 0]], dtype=DT))


def test_gae_ignores_rewards_and_values_on_padding() -> None:
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 5, generator=gen, dtype=DT)
    values = torch.randn(3, 5, generator=gen, dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    junk_r = rewards.masked_fill(mask.bool(), 0) * 0 + rewards.masked_fill(~mask.bool(), 1e6)
    junk_v = values.masked_fill(~mask.bool(), -1e6)
    adv2, ret2 = gae(junk_r, junk_v, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)


@PROPS
@given(
    lengths=st.lists(st.integers(0, 8), min_size=1, max_size=5),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gae_property_padding_is_zero_and_matches_loop(lengths, gamma, lam, seed) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    A = 8
    mask = torch.arange(A)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(len(lengths), A, generator=gen, dtype=DT)
    values = torch.randn(len(lengths), A, generator=gen, dtype=DT)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    torch.testing.assert_close(ret[mask], (adv + values)[mask])
    for b in range(len(lengths)):
        e_adv, _ = naive_gae_row(
            rewards[b].tolist(), values[b].tolist(), mask[b].tolist(), gamma, lam
        )
        assert adv[b].tolist() == pytest.approx(e_adv, abs=1e-9)


# ---------------------------------------------------------------------------- group estimators


def test_grpo_hand_computed() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=DT)
    adv = grpo_advantages(scores, group_size=3, eps=0.0 + 1e-12)
    # group 1: mean 2, unbiased std 1 -> [-1, 0, 1]; group 2: constant -> 0
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=DT))
    no_std = grpo_advantages(scores, 3, normalize_std=False)
    torch.testing.assert_close(no_std, torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0], dtype=DT))
    # default eps = 1e-6 is added to the std
    torch.testing.assert_close(
        grpo_advantages(torch.tensor([0.0, 2.0], dtype=DT), 2),
        torch.tensor([-1.0, 1.0], dtype=DT) / (math.sqrt(2) + 1e-6),
    )
    assert grpo_advantages(torch.tensor([3.0, 4.0]), 1).tolist() == [0.0, 0.0]


def test_grpo_matches_loop() -> None:
    gen = torch.Generator().manual_seed(5)
    G = 4
    scores = torch.randn(12, generator=gen, dtype=DT)
    adv = grpo_advantages(scores, G)
    s = scores.tolist()
    for g in range(3):
        grp = s[g * G : (g + 1) * G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for i in range(G):
            assert adv[g * G + i].item() == pytest.approx((grp[i] - mean) / (std + 1e-6))


def test_group_size_must_divide_batch() -> None:
    with pytest.raises(ValueError, match="multiple"):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(torch.zeros(4), 1)


def test_rloo_hand_computed_and_loop() -> None:
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT), 4)
    torch.testing.assert_close(
        adv, torch.tensor([1 - 3.0, 2 - 8 / 3, 3 - 7 / 3, 4 - 2.0], dtype=DT)
    )
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(9, generator=gen, dtype=DT)
    adv = rloo_advantages(scores, 3)
    s = scores.tolist()
    for i in range(9):
        g = i // 3
        others = [s[j] for j in range(g * 3, g * 3 + 3) if j != i]
        assert adv[i].item() == pytest.approx(s[i] - sum(others) / 2)
    # identity: RLOO = G / (G - 1) * (r - group mean)
    torch.testing.assert_close(adv, 1.5 * grpo_advantages(scores, 3, normalize_std=False))


def test_expand_to_tokens() -> None:
    adv = torch.tensor([1.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(
        expand_to_tokens(adv, mask), torch.tensor([[1.5, 1.5, 0], [-2.0, 0, 0]])
    )


# ---------------------------------------------------------------------------- whitening / REINFORCE++


def test_masked_whiten_matches_loop() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, generator=gen, dtype=DT) * 3 + 2
    mask = ragged_mask(4, 6, gen)
    vals = [x[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    out = masked_whiten(x, mask)
    out_keep = masked_whiten(x, mask, shift_mean=False)
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                assert out[b, t].item() == pytest.approx((x[b, t].item() - mean) / std)
                assert out_keep[b, t].item() == pytest.approx((x[b, t].item() - mean) / std + mean)
            else:
                assert out[b, t].item() == 0.0


@PROPS
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 100.0),
    shift=st.floats(-50, 50),
)
def test_masked_whiten_property(lengths, seed, scale, shift) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    if mask.sum() < 2:
        return
    x = torch.randn(len(lengths), 7, generator=gen, dtype=DT) * scale + shift
    x = x.masked_fill(~mask, 1e9)  # garbage on padding must not leak into the statistics
    out = masked_whiten(x, mask)
    assert abs(out[mask].mean().item()) < 1e-9
    var = x[mask].var(unbiased=False).item()
    assert out[mask].pow(2).mean().item() == pytest.approx(var / (var + 1e-8), rel=1e-9)
    if var > 1e-3:
        assert out[mask].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (out[~mask] == 0).all()


def test_reinforce_pp_returns() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0], [0.5, -1.0, 3.0, 9.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = reinforce_pp_returns(rewards, mask, gamma=0.5)
    expected_ret = torch.tensor([[0.25, 0.5, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(ret, expected_ret)
    vals = [0.25, 0.5, 1.0, 0.0, -1.0]
    mean = sum(vals) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 5 + 1e-8)
    expected_adv = ((expected_ret - mean) / std) * mask
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), expected_ret)
