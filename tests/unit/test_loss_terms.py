"""The learner's per-micro-batch loss terms against naive full-batch references.

A batch is cut into uneven micro-batches the way the learner cuts it (``batch.split``, which
also drops all-padding columns); each term is normalised by the global count, so the terms'
losses must sum to the loss of the whole batch, their gradients must accumulate to its
gradient, and their weighted stats must sum to the whole batch's metric. Logits come from an
embedding table (logits = E[input_ids]), so a micro-batch's logits are the rows of the full
batch's logits and gradients reach real parameters. Float64 throughout: the sums must agree
to rounding.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.batch import ExperienceBatch, PreferenceBatch, SequenceBatch
from rlhf_ray.loss_terms import PPOLossSettings, dpo_terms, ppo_terms, rm_terms, sft_terms
from rlhf_ray.losses import kl_penalty_loss, masked_mean, ppo_policy_loss, value_loss

DT = torch.float64
VOCAB = 13
PAD = 0
ROOT = Path(__file__).resolve().parents[2]


def embedding(seed: int = 0) -> torch.nn.Embedding:
    torch.manual_seed(seed)
    return torch.nn.Embedding(VOCAB, VOCAB, dtype=DT)


def sequences(prompt_lens: list[int], response_lens: list[int], seed: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return SequenceBatch.from_pairs([(ids(p), ids(r)) for p, r in zip(prompt_lens, response_lens)],
                                    PAD)


def grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def close(a, b, rtol: float = 1e-10) -> bool:
    """Equal to rounding (losses are float64 here)."""
    return torch.allclose(torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT),
                          rtol=rtol, atol=1e-12)


def stat_close(a, b) -> bool:
    """Equal to float32 rounding: masks, fractions and token shares are float32."""
    return close(a, b, rtol=1e-6)


def summed_terms(micro_batches: list, terms_of) -> tuple[list[torch.Tensor], dict]:
    """Sum each loss and each stat over the micro-batches, backward on every loss."""
    loss_sums: list[torch.Tensor] = []
    stat_sums: dict[str, torch.Tensor] = {}
    for mb in micro_batches:
        losses, stats = terms_of(mb)
        sum(losses).backward()
        loss_sums = [x.detach() + y.detach() for x, y in zip(loss_sums, losses)] if loss_sums \
            else [x.detach() for x in losses]
        for k, v in stats.items():
            stat_sums[k] = stat_sums.get(k, 0.0) + torch.as_tensor(v).detach().to(DT)
    return loss_sums, stat_sums


# --------------------------------------------------------------------------- SFT


def naive_sft(logits: torch.Tensor, batch: SequenceBatch, aggregation: str) -> torch.Tensor:
    """Cross entropy token by token: the mean over every response token of the batch, or the
    mean over sequences of each sequence's mean (a sequence without targets counts as 0)."""
    per_seq = []
    for b in range(len(batch)):
        logp = torch.log_softmax(logits[b], dim=-1)
        nll = [-logp[t - 1, batch.input_ids[b, t]] for t in range(1, logits.shape[1])
               if batch.loss_mask[b, t]]
        per_seq.append(nll)
    if aggregation == "token_mean":
        return sum(x for seq in per_seq for x in seq) / sum(len(seq) for seq in per_seq)
    return sum(sum(seq) / len(seq) if seq else 0.0 for seq in per_seq) / len(per_seq)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_sft_terms_sum_to_the_full_batch_loss(aggregation):
    batch = sequences([2, 3, 1, 4, 2], [5, 1, 3, 2, 6], seed=1)  # micro-batches of 2, 2, 1 rows
    num_tokens, num_seqs = float(batch.response_mask.sum()), float(len(batch))

    ref_model = embedding()
    expected = naive_sft(ref_model(batch.input_ids), batch, aggregation)
    expected.backward()

    model = embedding()
    losses, stats = summed_terms(batch.split(2), lambda mb: sft_terms(
        model(mb.input_ids), mb, aggregation, num_tokens, num_seqs))

    assert close(losses[0], expected)
    assert close(stats["policy/loss"], expected)
    assert torch.allclose(grads(model), grads(ref_model), rtol=1e-9, atol=1e-12)
    assert stats["perf/tokens"] == batch.attention_mask.sum()


# --------------------------------------------------------------------------- PPO


def experience(seed: int, model: torch.nn.Module, on_policy: bool = False) -> ExperienceBatch:
    base = sequences([2, 1, 3, 2, 1, 2], [4, 6, 1, 3, 5, 2], seed=seed)
    g = torch.Generator().manual_seed(seed)
    shape = (len(base), base.input_ids.shape[1] - 1)
    mask = base.response_mask

    def noise(scale: float) -> torch.Tensor:
        return scale * torch.randn(shape, generator=g, dtype=DT) * mask

    with torch.no_grad():
        logits = model(base.input_ids)
        current = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, base.input_ids[:, 1:, None]).squeeze(-1)
    return ExperienceBatch(
        base.input_ids, base.attention_mask, base.loss_mask,
        old_logprobs=None if on_policy else current + noise(0.5),  # some ratios clip
        ref_logprobs=current + noise(0.3), advantages=noise(1.0), returns=noise(1.0),
        old_values=None if on_policy else noise(1.0))


def critic(batch: SequenceBatch, weights: torch.Tensor) -> torch.Tensor:
    """(B, T-1) values, a function of each next token (so micro-batch values are rows of the
    full batch's)."""
    return weights[batch.input_ids[:, 1:]]


SETTINGS = PPOLossSettings(clip_eps=0.2, clip_eps_high=0.28, dual_clip=1.5, kl_coef=0.1,
                           kl_estimator="k3", value_clip_eps=0.2)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_ppo_terms_sum_to_the_full_batch_losses_and_metrics(aggregation):
    model = embedding(seed=2)
    batch = experience(3, model)
    mask = batch.response_mask
    real_tokens = float(mask.sum())
    agg = {"aggregation": aggregation, "num_tokens": real_tokens, "num_seqs": float(len(batch))}
    torch.manual_seed(4)
    weights = torch.randn(VOCAB, dtype=DT, requires_grad=True)

    # the whole batch, straight from rlhf_ray.losses
    logits = model(batch.input_ids)
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(
        -1, batch.input_ids[:, 1:, None]).squeeze(-1)
    policy, m = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask,
                                SETTINGS.clip_eps, SETTINGS.clip_eps_high, SETTINGS.dual_clip,
                                **agg)
    kl = kl_penalty_loss(logprobs, batch.ref_logprobs, mask, SETTINGS.kl_estimator, **agg)
    values = critic(batch, weights)
    v_loss, vm = value_loss(values, batch.old_values, batch.returns, mask,
                            SETTINGS.value_clip_eps, **agg)
    (policy + SETTINGS.kl_coef * kl + v_loss).backward()
    want_grads = grads(model), weights.grad.clone()
    probs = torch.softmax(logits[:, :-1].detach(), -1)
    entropy = -(probs * torch.log(probs)).sum(-1)
    assert 0 < float(m["clip_frac"]) < 1 and float(m["dual_clip_frac"]) > 0  # both clips act

    model.zero_grad()
    weights.grad = None
    settings = dataclasses.replace(SETTINGS, aggregation=aggregation)
    losses, stats = summed_terms(batch.split(4), lambda mb: ppo_terms(
        model(mb.input_ids), critic(mb, weights), mb, settings, agg["num_tokens"],
        agg["num_seqs"], real_tokens))

    assert close(losses[0], policy + SETTINGS.kl_coef * kl)
    assert close(losses[1], v_loss)
    assert torch.allclose(grads(model), want_grads[0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(weights.grad, want_grads[1], rtol=1e-9, atol=1e-12)
    assert close(stats["policy/loss"], policy)
    assert close(stats["kl/ref"], kl)
    assert close(stats["value/loss"], v_loss)
    for k in ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean"):
        assert stat_close(stats[f"policy/{k}"], m[k]), k  # token means of the whole batch
    assert stat_close(stats["value/clip_frac"], vm["value_clip_frac"])
    assert stat_close(stats["value/mean"], vm["values_mean"])
    assert stat_close(stats["policy/entropy"], masked_mean(entropy, mask))
    assert stats["perf/tokens"] == batch.attention_mask.sum()


def test_ppo_terms_on_policy_is_the_plain_policy_gradient_loss():
    """No old log-probs: ratio 1, nothing clipped, loss = -sum(A) / tokens; no ref: no KL."""
    model = embedding(seed=5)
    batch = experience(6, model, on_policy=True)
    batch.ref_logprobs = None
    real_tokens = float(batch.response_mask.sum())
    losses, stats = summed_terms(batch.split(3), lambda mb: ppo_terms(
        model(mb.input_ids), None, mb, PPOLossSettings(kl_coef=0.5), real_tokens,
        float(len(batch)), real_tokens))
    assert len(losses) == 1 and "kl/ref" not in stats and "value/loss" not in stats
    assert close(losses[0], -(batch.advantages * batch.response_mask).sum() / real_tokens)
    assert stat_close(stats["policy/ratio_mean"], 1.0)
    assert stats["policy/clip_frac"] == 0


@pytest.mark.parametrize("correction", ["tis", "mask", "none"])
def test_pi_old_from_the_update_equals_a_separate_pi_old_pass(correction):
    """One update on the current weights: the driver either computes pi_old in a separate
    pass, weights the advantages by the rollout correction and reports kl/mean, or leaves
    old_logprobs out and the loss terms do the same from the update's own forward. Losses,
    gradients and stats agree, summed over micro-batches."""
    from rlhf_ray.advantages import kl_estimate
    from rlhf_ray.experience import rollout_correction

    model = embedding(seed=11)
    batch = experience(12, model, on_policy=True)
    mask = batch.response_mask
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        pi_old = torch.log_softmax(model(batch.input_ids)[:, :-1], -1).gather(
            -1, batch.input_ids[:, 1:, None]).squeeze(-1) * mask
    # the engine that sampled differs a little, some tokens (or sequences) past the cap
    shift = 0.6 * torch.randn(pi_old.shape, generator=g, dtype=DT) + \
        0.6 * torch.randn((len(batch), 1), generator=g, dtype=DT)
    batch.rollout_logprobs = (pi_old + shift) * mask
    settings = PPOLossSettings(kl_coef=0.1, rollout_correction=correction, rollout_correction_cap=1.5,
                               kl_metric_estimator="k1")
    real_tokens, seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())

    # the separate pass, as the driver does it
    weights, want = rollout_correction(pi_old, batch.rollout_logprobs, mask, correction, 1.5)
    want["kl/mean"] = float((kl_estimate(pi_old, batch.ref_logprobs, "k1") * mask).sum(-1).mean())
    separate = dataclasses.replace(batch, old_logprobs=pi_old, advantages=batch.advantages * weights)
    want_losses, want_stats = summed_terms(separate.split(4), lambda mb: ppo_terms(
        model(mb.input_ids), None, mb, settings, real_tokens, seqs, real_tokens))
    want_grads = grads(model)
    if correction != "none":
        assert 0 < want["rollout/is_clipped_frac"] < 1  # the correction acts

    model.zero_grad()
    losses, stats = summed_terms(batch.split(4), lambda mb: ppo_terms(
        model(mb.input_ids), None, mb, settings, real_tokens, seqs, real_tokens, float(len(batch))))
    assert close(losses[0], want_losses[0])
    assert torch.allclose(grads(model), want_grads, rtol=1e-9, atol=1e-12)
    for k in ("policy/loss", "kl/ref", "policy/entropy"):
        assert close(stats[k], want_stats[k]), k
    for k, v in want.items():
        if correction == "none" and k.startswith("rollout/"):
            assert k not in stats
        else:
            assert stat_close(stats[k], v), (k, float(stats[k]), v)


def test_ppo_step_takes_one_settings_object_defaulting_to_plain_ppo():
    """ppo_step(batch, settings, ...) takes a PPOLossSettings, not a tuple of positional knobs
    (read from the source: importing the learner needs Ray)."""
    tree = ast.parse((ROOT / "rlhf_ray/workers/learner.py").read_text())
    step = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                and n.name == "ppo_step")
    assert [a.arg for a in step.args.args] == ["self", "batch", "settings", "num_tokens_global",
                                               "num_seqs_global", "train_policy"]
    assert ast.unparse(step.args.defaults[0]) == "loss_terms.PPOLossSettings()"
    settings = PPOLossSettings()
    assert (settings.clip_eps, settings.kl_coef, settings.kl_estimator, settings.policy_loss,
            settings.aggregation, settings.entropy_coef, settings.temperature) == \
        (0.2, 0.0, "k3", "ppo", "token_mean", 0.0, 1.0)


# --------------------------------------------------------------------------- DPO and RM


def preferences(n: int, seed: int) -> PreferenceBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 6, (4, n), generator=g).tolist()
    chosen = sequences(lens[0], lens[1], seed + 1)
    rejected = sequences(lens[2], lens[3], seed + 2)
    return PreferenceBatch(chosen, rejected, torch.randn(n, generator=g, dtype=DT) - 8,
                           torch.randn(n, generator=g, dtype=DT) - 8)


def naive_logp(model: torch.nn.Module, seq: SequenceBatch, row: int) -> torch.Tensor:
    """Summed log-prob of one sequence's targets, token by token."""
    logp = torch.log_softmax(model(seq.input_ids[row]), dim=-1)
    return sum(logp[t - 1, seq.input_ids[row, t]] for t in range(1, seq.input_ids.shape[1])
               if seq.loss_mask[row, t])


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_terms_sum_to_the_full_batch_loss_and_metrics(loss_type, smoothing):
    beta, n = 0.5, 5
    batch = preferences(n, seed=7)

    ref_model = embedding(seed=8)
    pc = torch.stack([naive_logp(ref_model, batch.chosen, i) for i in range(n)])
    pr = torch.stack([naive_logp(ref_model, batch.rejected, i) for i in range(n)])
    h = (pc - batch.ref_chosen_logps) - (pr - batch.ref_rejected_logps)
    if loss_type == "sigmoid":
        per_pair = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    else:
        per_pair = (h - 1 / (2 * beta)) ** 2
    expected = per_pair.mean()
    expected.backward()

    model = embedding(seed=8)

    def terms(mb: PreferenceBatch):
        both = mb.stacked(PAD)
        return dpo_terms(model(both.input_ids), both, mb, beta, loss_type, smoothing, float(n))

    losses, stats = summed_terms(batch.split(2), terms)  # 2, 2 and 1 pairs

    assert close(losses[0], expected)
    assert close(stats["dpo/loss"], expected)
    assert torch.allclose(grads(model), grads(ref_model), rtol=1e-9, atol=1e-12)
    chosen_rewards = beta * (pc - batch.ref_chosen_logps).detach()
    rejected_rewards = beta * (pr - batch.ref_rejected_logps).detach()
    margins = chosen_rewards - rejected_rewards
    assert 0 < float((margins > 0).double().mean()) < 1  # the accuracy is not trivially 0 or 1
    assert stat_close(stats["dpo/accuracy"], (margins > 0).double().mean())
    assert stat_close(stats["dpo/chosen_rewards"], chosen_rewards.mean())
    assert stat_close(stats["dpo/rejected_rewards"], rejected_rewards.mean())
    assert stat_close(stats["dpo/margin"], margins.mean())
    assert stat_close(stats["dpo/chosen_logps"], pc.detach().mean())
    assert stats["perf/tokens"] == (batch.chosen.attention_mask.sum()
                                    + batch.rejected.attention_mask.sum())


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_rm_terms_sum_to_the_full_batch_loss_and_metrics(margin):
    n = 7
    batch = preferences(n, seed=9)
    torch.manual_seed(10)
    chosen = torch.randn(n, dtype=DT, requires_grad=True)
    rejected = torch.randn(n, dtype=DT, requires_grad=True)

    expected = sum(-F.logsigmoid(chosen[i] - rejected[i] - margin) for i in range(n)) / n
    want = torch.autograd.grad(expected, [chosen, rejected])

    losses, stats = [], {}
    starts = range(0, n, 3)  # 3, 3 and 1 pairs
    for mb, s in zip(batch.split(3), starts):
        rows = slice(s, s + len(mb))
        scores = torch.cat([chosen[rows], rejected[rows]])
        mb_losses, mb_stats = rm_terms(scores, mb, margin, float(n))
        losses.append(mb_losses[0])
        for k, v in mb_stats.items():
            stats[k] = stats.get(k, 0.0) + v.detach().to(DT)
    total = sum(losses)
    got = torch.autograd.grad(total, [chosen, rejected])

    assert close(total, expected)
    assert close(stats["rm/loss"], expected)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(got, want))
    diff = (chosen - rejected).detach()
    assert 0 < float((diff > 0).double().mean()) < 1
    assert stat_close(stats["rm/accuracy"], (diff > 0).double().mean())
    assert stat_close(stats["rm/chosen_score"], chosen.detach().mean())
    assert stat_close(stats["rm/rejected_score"], rejected.detach().mean())
    assert stat_close(stats["rm/margin"], diff.mean())
    assert stats["perf/tokens"] == (batch.chosen.attention_mask.sum()
                                    + batch.rejected.attention_mask.sum())


# --------------------------------------------------------------------------- purity


def test_loss_terms_imports_only_torch_and_the_math_modules():
    tree = ast.parse((ROOT / "rlhf_ray/loss_terms.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    allowed = {"__future__", "dataclasses", "torch", "rlhf_ray.batch", "rlhf_ray.losses",
               "rlhf_ray.advantages", "rlhf_ray.experience"}  # torch-only math, the same layer
    assert imported <= allowed, imported - allowed


@pytest.mark.parametrize("policy_loss, aggregation", [("gspo", "seq_mean_token_mean"),
                                                     ("ppo", "seq_mean_token_sum_norm")])
def test_ppo_terms_with_gspo_dr_grpo_and_an_entropy_bonus_sum_to_the_full_batch(policy_loss, aggregation):
    """The options users pick (GSPO's sequence ratio, Dr. GRPO's constant normaliser, the
    entropy bonus) keep the rule that micro-batch terms sum to the full-batch loss."""
    from rlhf_ray.losses import entropy_bonus_loss, gspo_policy_loss

    model = embedding(seed=7)
    batch = experience(5, model)
    batch.ref_logprobs = None
    mask = batch.response_mask
    real_tokens = float(mask.sum())
    settings = PPOLossSettings(clip_eps=3e-4 if policy_loss == "gspo" else 0.2,
                               clip_eps_high=4e-4 if policy_loss == "gspo" else None,
                               aggregation=aggregation, norm_len=12.0, policy_loss=policy_loss,
                               entropy_coef=0.01)
    agg = {"aggregation": aggregation, "num_tokens": real_tokens, "num_seqs": float(len(batch)),
           "norm_len": 12.0}
    logits = model(batch.input_ids)
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    fn = gspo_policy_loss if policy_loss == "gspo" else ppo_policy_loss
    policy, _ = fn(logprobs, batch.old_logprobs, batch.advantages, mask, settings.clip_eps,
                   settings.clip_eps_high, None, **agg)
    want = policy + 0.01 * entropy_bonus_loss(logits[:, :-1], mask, **agg)
    want.backward()
    want_grad = grads(model)
    model.zero_grad()
    losses, _ = summed_terms(batch.split(2), lambda mb: ppo_terms(
        model(mb.input_ids), None, mb, settings, real_tokens, float(len(batch)), real_tokens))
    assert close(losses[0], want)
    assert torch.allclose(grads(model), want_grad, rtol=1e-9, atol=1e-12)


def test_ppo_terms_on_the_response_window_equal_the_full_width():
    """The learner computes logits only from the micro-batch's first response position on
    (``logits_to_keep``) and hands the loss terms the same window of the batch
    (``from_column``): the losses, stats and gradients are those of the full width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, pad_token_id=PAD)).to(DT)
    base = sequences([4, 3, 6], [2, 5, 1], seed=3)
    g = torch.Generator().manual_seed(3)
    noise = lambda s: s * torch.randn(base.response_mask.shape, generator=g, dtype=DT) * base.response_mask  # noqa: E731
    with torch.no_grad():
        current = torch.log_softmax(model(base.input_ids, attention_mask=base.attention_mask).logits[:, :-1], -1)
        current = current.gather(-1, base.input_ids[:, 1:, None]).squeeze(-1)
    batch = ExperienceBatch(base.input_ids, base.attention_mask, base.loss_mask,
                            old_logprobs=current + noise(0.5), ref_logprobs=current + noise(0.3),
                            advantages=noise(1.0), returns=noise(1.0), old_values=noise(1.0))
    start = batch.first_target_column()
    assert start == 2  # the shortest prompt has 3 tokens: position 2 predicts its first response token
    weights = torch.randn(VOCAB, dtype=DT, requires_grad=True)
    settings = PPOLossSettings(kl_coef=0.1, entropy_coef=0.01)
    n_tok, real = float(batch.response_mask.sum()), float(batch.response_mask.sum())
    results = []
    for keep_from in (0, start):
        model.zero_grad()
        weights.grad = None
        keep = {"logits_to_keep": batch.input_ids.shape[1] - keep_from} if keep_from else {}
        logits = model(batch.input_ids, attention_mask=batch.attention_mask, **keep).logits
        assert logits.shape[1] == batch.input_ids.shape[1] - keep_from
        values = critic(batch, weights)[:, keep_from:]
        losses, stats = ppo_terms(logits, values, batch.from_column(keep_from), settings, n_tok, len(batch), real)
        sum(losses).backward()
        results.append((losses, stats, torch.cat([grads(model), weights.grad])))
    (full_losses, full_stats, full_grads), (win_losses, win_stats, win_grads) = results
    for a, b in zip(full_losses, win_losses):
        assert close(a, b)
    for key, value in full_stats.items():
        if key != "perf/tokens":  # the learner counts the whole micro-batch's tokens itself
            assert stat_close(value, win_stats[key]), key
    assert torch.allclose(full_grads, win_grads, rtol=1e-9, atol=1e-12)
