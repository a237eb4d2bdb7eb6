"""LearnerWorker: real Ray actors, real DeepSpeed (gloo on CPU), the tiny Llama.

The key claim: D ranks with micro-batches give the same update as one rank holding the whole
global batch, because losses are normalised by the global token count and each rank's loss
is multiplied by world_size (DeepSpeed averages gradients over ranks). AdamW's first update
(and a clipped gradient) barely depends on the gradient's scale, so the test also compares
the pre-clip gradient norms, and repeats the comparison in a "linear" regime (eps=1, no clip)
where the weights after one step are ~ lr * gradient. Dropping the world_size factor was
checked to fail both: grad-norm ratio 0.5, and a 5e-3 weight difference in "linear".
"""

from __future__ import annotations

import ast
import contextlib
import glob
import math
import os
import subprocess
import sys

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch, PreferenceBatch, SequenceBatch
from rlhf_ray.config import LearnerConfig, OptimConfig
from rlhf_ray.loss_terms import PPOLossSettings
from rlhf_ray.workers.deepspeed_setup import ds_config, lr_schedule
from rlhf_ray.workers.group import WorkerError, WorkerGroup, WorkerResources
from rlhf_ray.workers.learner import LearnerWorker

PAD = 2  # <|im_end|>, eos and pad of the tiny models
SHM = "/dev/shm/deepspeed_allreduce_buffer_*"


# Optimizer regimes of the data-parallel test. "adamw" is the default recipe. In "linear",
# eps=1 >> |g| makes AdamW's first update lr * g / (|g| + 1) ~ lr * g, and no clipping, so
# the weights after one step expose any error in the gradient's scale or direction.
REGIMES = {"adamw": {"lr": 1e-3}, "linear": {"lr": 0.1, "grad_clip": 0.0, "eps": 1.0}}


def optim_config(lr: float = 1e-3, grad_clip: float = 1.0, eps: float = 1e-8):
    return OptimConfig(lr=lr, grad_clip=grad_clip, eps=eps)


@contextlib.contextmanager
def learners(n: int, path: str, zero_stage: int = 0, micro_batch_size: int = 4,
             optim: OptimConfig | None = None, init: bool = True, offload: bool = False,
             gradient_checkpointing: bool = False, autocast: str = "none", shared_prompt: bool = True,
             **kwargs):
    """A distributed group of ``n`` learners (num_cpus=0), shut down on exit."""
    cfg = LearnerConfig(num_workers=n, zero_stage=zero_stage, micro_batch_size=micro_batch_size,
                        offload=offload, gradient_checkpointing=gradient_checkpointing,
                        autocast=autocast, shared_prompt=shared_prompt)
    optim = optim or optim_config()
    group = WorkerGroup(LearnerWorker, "learner", n, args=(path, cfg, optim),
                        kwargs=kwargs, distributed=True, timeout_s=300,
                        resources=WorkerResources(num_cpus=0))
    try:
        if init:
            group.call("init")
        yield group
    finally:
        group.shutdown()


def make_batch(n: int, seed: int, prompt=(3, 7), response=(2, 12)) -> SequenceBatch:
    """Varying prompt and response lengths, right-padded; token ids avoid the pad id."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(100, 1000, (k,), generator=g).tolist()

    return SequenceBatch.from_pairs([(ids(*prompt), ids(*response)) for _ in range(n)], PAD)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def hf_logprobs(model, batch: SequenceBatch) -> torch.Tensor:
    """(B, T-1) plain transformers log-probs (log_softmax + gather)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)


def masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).max())


@pytest.fixture(scope="module", autouse=True)
def no_shm_buffers_left():
    before = set(glob.glob(SHM))
    yield
    assert set(glob.glob(SHM)) - before == set(), "learners left DeepSpeed shm buffers"


@pytest.fixture(scope="module")
def policy(ray_local, tiny_llama):
    """One ZeRO-1 rank with a value model and gradient checkpointing, shared by the
    single-rank tests (each test reads the current weights, so order does not matter)."""
    with learners(1, tiny_llama, zero_stage=1, micro_batch_size=3, with_value=True,
                  gradient_checkpointing=True) as group:
        yield group


@pytest.fixture(scope="module")
def one_rank_update(ray_local, tiny_llama):
    """The reference per regime: one ZeRO-0 rank, the whole global batch in one micro-batch."""
    cache: dict[str, tuple] = {}

    def get(regime: str) -> tuple:
        if regime not in cache:
            with learners(1, tiny_llama, micro_batch_size=8,
                          optim=optim_config(**REGIMES[regime])) as group:
                before = group.call("get_state_dict")[0]
                metrics = group.call("sft_step", make_batch(8, seed=1))[0]
                cache[regime] = before, metrics, group.call("get_state_dict")[0]
        return cache[regime]

    return get


# --------------------------------------------------------------------------- SFT, one rank


def test_sft_changes_weights_and_loss_decreases(policy):
    batch = make_batch(5, seed=0)
    before = policy.call("get_state_dict")[0]
    losses = []
    for _ in range(5):
        m = policy.call("sft_step", batch)[0]
        assert math.isfinite(m["policy/loss"]) and m["policy/grad_norm"] > 0
        losses.append(m["policy/loss"])
    after = policy.call("get_state_dict")[0]
    assert max_diff(before, after) > 1e-4
    assert losses[-1] < losses[0] - 0.1, losses
    assert m["policy/lr"] == pytest.approx(1e-3)
    assert m["perf/tokens"] == float(batch.attention_mask.sum()) and m["perf/train_s"] > 0
    ev = policy.call("evaluate", batch, "sft")[0]
    assert ev["eval/loss"] < losses[-1]  # held-out API: no update, loss after the last step
    assert policy.call("evaluate", batch, "sft")[0] == ev


def test_forward_logprobs_match_transformers(policy, tiny_llama):
    from transformers import AutoModelForCausalLM

    batch = make_batch(5, seed=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.load_state_dict(policy.call("get_state_dict")[0])  # same weights as the learner
    ours = policy.call("forward_logprobs", batch)[0]
    assert ours.shape == (5, batch.input_ids.shape[1] - 1) and ours.dtype == torch.float32
    diff = masked_max_diff(ours, hf_logprobs(model, batch), batch.attention_mask[:, 1:])
    assert diff <= 1e-5, diff


def test_packed_sft_batch_equals_its_examples_unpacked(policy):
    """Packs from the driver (pack_sft -> sequence_batch) carry position and document ids; the
    learner runs each packed example alone, so the held-out loss and the per-token log-probs
    equal those of the examples unpacked. (A plain causal mask over the packs: the per-token
    log-probs move by ~0.3.)"""
    from rlhf_ray.data import SFTExample, pack_sft
    from rlhf_ray.driver.batches import sequence_batch

    g = torch.Generator().manual_seed(5)
    examples = []
    for row in range(7):
        prompt, response = (int(torch.randint(3, 8, (1,), generator=g)),
                            int(torch.randint(2, 13, (1,), generator=g)))
        examples.append(SFTExample(torch.randint(100, 1000, (prompt + response,),
                                                 generator=g).tolist(),
                                   [0] * prompt + [1] * response, row=row))
    packs = pack_sft(examples, 40)
    assert 1 < len(packs) < len(examples) and len({len(p) for p in packs}) > 1
    packed, unpacked = sequence_batch(packs, PAD), sequence_batch(examples, PAD)
    assert packed.document_ids is not None and unpacked.document_ids is None

    ev_packed = policy.call("evaluate", packed, "sft")[0]["eval/loss"]
    ev_unpacked = policy.call("evaluate", unpacked, "sft")[0]["eval/loss"]
    assert ev_packed == pytest.approx(ev_unpacked, rel=1e-5, abs=0)

    lp_packed = policy.call("forward_logprobs", packed)[0]
    lp_unpacked = policy.call("forward_logprobs", unpacked)[0]
    i, diff = 0, 0.0
    for p, pack in enumerate(packs):
        start = 0
        for _ in pack.rows:
            n = len(examples[i].input_ids)
            diff = max(diff, float((lp_packed[p, start: start + n - 1]
                                    - lp_unpacked[i, : n - 1]).abs().max()))
            start, i = start + n, i + 1
    assert diff <= 1e-5, diff


def test_forward_logprobs_and_ppo_step_use_the_sampling_temperature(policy, tiny_llama):
    """Rollouts sampled at T score their tokens under softmax(logits / T): so must the learner,
    or the PPO ratio starts away from 1 and the KL measures the temperature, not the policy."""
    from transformers import AutoModelForCausalLM

    batch = make_batch(4, seed=11)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.load_state_dict(policy.call("get_state_dict")[0])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    tempered = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    ours = policy.call("forward_logprobs", batch, 0.7)[0]
    mask = batch.attention_mask[:, 1:]
    assert masked_max_diff(ours, tempered, mask) <= 1e-5
    assert masked_max_diff(policy.call("forward_logprobs", batch)[0], tempered, mask) > 1e-2
    # the first step on rollouts' tempered log-probs is on-policy: ratio 1, nothing clipped
    exp = ExperienceBatch(**batch.tensors(), old_logprobs=ours, ref_logprobs=ours.clone(),
                          advantages=torch.ones_like(ours) * batch.response_mask,
                          returns=torch.zeros_like(ours))
    first = policy.call("ppo_step", exp, PPOLossSettings(temperature=0.7))[0]
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["policy/clip_frac"] == 0.0
    assert abs(first["kl/ref"]) < 1e-6


def test_weight_sender_publishes_the_full_state(policy):
    import ray

    refs = policy.call("publish_weights")[0]
    assert len(refs) == 1
    assert max_diff(ray.get(refs[0]), policy.call("get_state_dict")[0]) == 0.0


def test_export_hf_loads_and_matches(policy, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = make_batch(4, seed=3)
    policy.call("sft_step", batch)
    policy.call("export_hf", str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert model.config.use_cache  # the export is ready for generation
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert max_diff(model.state_dict(), original.state_dict()) > 1e-4  # the trained weights
    ours = policy.call("forward_logprobs", batch)[0]
    diff = masked_max_diff(ours, hf_logprobs(model, batch), batch.attention_mask[:, 1:])
    assert diff <= 1e-5, diff


def test_checkpoint_restores_in_fresh_group(policy, tiny_llama, tmp_path):
    batch = make_batch(4, seed=4)
    policy.call("sft_step", batch)  # optimizer state worth restoring
    policy.call("save_checkpoint", str(tmp_path), "step1", {"step": 1, "note": "x"})
    with learners(1, tiny_llama, zero_stage=1, micro_batch_size=3, with_value=True,
                  gradient_checkpointing=True) as fresh:
        assert fresh.call("load_checkpoint", str(tmp_path))[0] == {"step": 1, "note": "x"}
        for model in ("policy", "value"):
            a, b = (g.call("get_state_dict", model)[0] for g in (policy, fresh))
            assert max_diff(a, b) == 0.0
        # Optimizer moments and LR schedule came back too: the next step agrees.
        m_a, m_b = (g.call("sft_step", batch)[0] for g in (policy, fresh))
        assert m_a["policy/loss"] == m_b["policy/loss"]
        assert max_diff(policy.call("get_state_dict")[0], fresh.call("get_state_dict")[0]) <= 1e-7


def test_checkpoint_restores_the_dropout_random_state(ray_local, tiny_llama, tmp_path):
    """With dropout on, the step after a resume draws the masks the straight run drew."""
    import json
    import shutil

    model = tmp_path / "dropout_model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.5}))
    batch = make_batch(4, seed=5)
    with learners(1, str(model), micro_batch_size=4) as straight:
        straight.call("sft_step", batch)
        straight.call("save_checkpoint", str(tmp_path / "ckpt"), "step1", {"step": 1})
        after_save = straight.call("sft_step", batch)[0]["policy/loss"]
    with learners(1, str(model), micro_batch_size=4) as resumed:
        resumed.call("load_checkpoint", str(tmp_path / "ckpt"), "step1")
        # Without the saved random state the fresh process draws other masks (measured:
        # the loss is then off by about 1 %), so the losses would not be equal.
        assert resumed.call("sft_step", batch)[0]["policy/loss"] == after_save


# --------------------------------------------------------------------------- PPO and DPO


def test_ppo_step_with_value_model(policy):
    seq = make_batch(6, seed=5)
    mask = seq.response_mask
    old = policy.call("forward_logprobs", seq)[0]
    g = torch.Generator().manual_seed(0)
    exp = ExperienceBatch(**seq.tensors(), old_logprobs=old, ref_logprobs=old.clone(),
                          advantages=torch.randn(mask.shape, generator=g) * mask,
                          returns=torch.full(mask.shape, 0.5) * mask)
    first = policy.call("ppo_step", exp, PPOLossSettings(kl_coef=0.1))[0]
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/clip_frac"] == 0.0 and abs(first["kl/ref"]) < 1e-6
    assert policy.call("forward_values", seq)[0].shape == old.shape
    steps = [policy.call("ppo_step", exp, PPOLossSettings(kl_coef=0.1))[0] for _ in range(3)]
    for m in [first, *steps]:
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["value/grad_norm"] > 0 and m["policy/entropy"] > 0
    assert steps[-1]["value/loss"] < first["value/loss"]
    assert steps[-1]["policy/approx_kl"] > 0 and steps[-1]["kl/ref"] > 0  # the policy moved


def test_bf16_autocast_learner_keeps_fp32_weights_and_close_logprobs(ray_local, tiny_llama):
    """learner.autocast=bfloat16: bf16 matmuls, so log-probs move a little from fp32 (the
    autocast is on) but stay close; weights, returned log-probs and the update stay fp32,
    and pi_old from the update's own forward gives ratio 1."""
    from transformers import AutoModelForCausalLM

    seq = make_batch(6, seed=7)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    want = hf_logprobs(model, seq)
    with learners(1, tiny_llama, autocast="bfloat16") as group:
        got = group.call("forward_logprobs", seq)[0]
        mask = seq.attention_mask[:, 1:]
        diff = (got - want).abs() * mask
        assert got.dtype == torch.float32
        assert 1e-5 < float(diff.max()) and float(diff.sum() / mask.sum()) < 0.05, diff.max()
        g = torch.Generator().manual_seed(1)
        exp = ExperienceBatch(**seq.tensors(), ref_logprobs=got.clone(),
                              advantages=torch.randn(seq.response_mask.shape, generator=g) * seq.response_mask)
        m = group.call("ppo_step", exp, PPOLossSettings(kl_coef=0.1, kl_metric_estimator="k1"))[0]
        assert m["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["policy/grad_norm"] > 0
        assert abs(m["kl/mean"]) < 1e-6  # the reference is this policy
        state = group.call("get_state_dict")[0]
        assert all(v.dtype == torch.float32 for v in state.values())
        assert max_diff(state, model.state_dict()) > 0  # it stepped


def test_a_reference_under_the_learners_autocast_agrees_with_it(ray_local, tiny_llama):
    """With learner.autocast=bfloat16 the reference runs under the same autocast: at the
    start (policy = reference) both give the same summed log-probs, which an fp32
    reference does not (DPO would not start at ln 2, PPO's KL not at 0)."""
    from rlhf_ray.workers.reference import ReferenceServer

    seq = make_batch(6, seed=11)
    with learners(1, tiny_llama, autocast="bfloat16") as group:
        policy = (group.call("forward_logprobs", seq)[0] * seq.response_mask).sum(-1)
    same = ReferenceServer(tiny_llama, micro_batch_size=4, autocast="bfloat16").sequence_logps(seq)
    fp32 = ReferenceServer(tiny_llama, micro_batch_size=4).sequence_logps(seq)
    assert float((same - policy).abs().max()) < 1e-4 < float((fp32 - policy).abs().max())
    with pytest.raises(ValueError, match="reference autocast: expected"):
        ReferenceServer(tiny_llama, autocast="float16")


def test_value_warmup_steps_only_the_value_model(policy):
    seq = make_batch(6, seed=8)
    mask = seq.response_mask
    old = policy.call("forward_logprobs", seq)[0]
    exp = ExperienceBatch(**seq.tensors(), old_logprobs=old, ref_logprobs=old.clone(),
                          advantages=torch.ones(mask.shape) * mask,
                          returns=torch.full(mask.shape, 2.0) * mask)
    weights = policy.call("get_state_dict")[0]
    values = policy.call("forward_values", seq)[0]
    m = policy.call("ppo_step", exp, train_policy=False)[0]
    assert "policy/grad_norm" not in m and m["value/grad_norm"] > 0
    assert math.isfinite(m["policy/loss"])  # still reported
    after = policy.call("get_state_dict")[0]
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # the policy did not move
    assert not torch.equal(values, policy.call("forward_values", seq)[0])  # the critic did


def test_fresh_value_head_starts_at_zero(tiny_llama):
    from rlhf_ray.models import load_model
    from rlhf_ray.workers.deepspeed_setup import zero_scalar_head

    value = load_model(tiny_llama, "value", "float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert value(input_ids=ids).logits.abs().max() > 0
    zero_scalar_head(value)
    assert value(input_ids=ids).logits.abs().max() == 0


def test_dpo_step_uses_reference_logps(policy):
    chosen, rejected = make_batch(4, seed=6), make_batch(4, seed=7)

    def seq_logps(b):
        return (policy.call("forward_logprobs", b)[0] * b.response_mask).sum(-1)

    pref = PreferenceBatch(chosen, rejected, seq_logps(chosen), seq_logps(rejected))
    first = policy.call("dpo_step", pref, beta=0.1)[0]
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    for _ in range(3):
        m = policy.call("dpo_step", pref, beta=0.1)[0]
    assert m["dpo/loss"] < first["dpo/loss"] and m["dpo/margin"] > 0
    assert m["dpo/accuracy"] == pytest.approx(1.0)
    assert policy.call("evaluate", pref, "dpo", beta=0.1)[0]["eval/loss"] < m["dpo/loss"]
    with pytest.raises(WorkerError, match="ref_chosen_logps"):
        policy.call("dpo_step", PreferenceBatch(chosen, rejected))


# --------------------------------------------------------------------------- data parallel


@pytest.mark.parametrize("zero_stage,regime", [(2, "adamw"), (3, "adamw"), (0, "linear"),
                                               (2, "linear"), (3, "linear")])
def test_two_ranks_equal_one_rank(zero_stage, regime, one_rank_update, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    before, ref_metrics, ref_after = one_rank_update(regime)
    batch = make_batch(8, seed=1)
    # Unequal shards: 5 rows (3 micro-batches of 2) and 3 rows (2 micro-batches).
    shards = [batch.select(slice(0, 5)), batch.select(slice(5, 8))]
    assert shards[0].response_mask.sum() != shards[1].response_mask.sum()
    with learners(2, tiny_llama, zero_stage=zero_stage, micro_batch_size=2,
                  optim=optim_config(**REGIMES[regime])) as group:
        metrics = group.call_each("sft_step", [(s,) for s in shards])
        after = group.call("get_state_dict")
        assert group.call("export_hf", str(tmp_path)) == [str(tmp_path), None]
    assert after[1] == {}  # full weights on rank 0 only
    exported = load_file(tmp_path / "model.safetensors")
    assert max_diff(exported, {k: after[0][k] for k in exported}) == 0.0
    update = max_diff(before, ref_after)
    diff = max_diff(ref_after, after[0])
    norm_rel = abs(metrics[0]["policy/grad_norm"] / ref_metrics["policy/grad_norm"] - 1)
    print(f"\nZeRO-{zero_stage} {regime}: 2 ranks vs 1 rank max |dW| = {diff:.3g} "
          f"(largest update {update:.3g}), grad-norm relative diff {norm_rel:.3g}")
    # adamw: AdamW's first step is lr * g / (|g| + 1e-8); the few weights whose gradient is
    # ~1e-8 turn fp32 summation-order noise into up to ~1 % of lr (measured 7.1e-6).
    assert diff <= (2e-5 if regime == "adamw" else 1e-6)
    assert update > 1e-4
    assert norm_rel <= 1e-4  # a world_size slip would give 2x or 0.5x
    assert metrics[0]["policy/loss"] == pytest.approx(ref_metrics["policy/loss"], rel=1e-6)
    assert metrics[0] == metrics[1] | {"perf/train_s": metrics[0]["perf/train_s"]}


def test_zero3_two_rank_checkpoint_round_trip(ray_local, tiny_llama, tmp_path):
    """ZeRO-3 checkpoints hold one partition per rank; a fresh group restores all of it."""
    batch = make_batch(6, seed=10)
    shards = [(batch.select(slice(0, 3)),), (batch.select(slice(3, 6)),)]
    with learners(2, tiny_llama, zero_stage=3, micro_batch_size=2) as first:
        first.call_each("sft_step", shards)
        first.call("save_checkpoint", str(tmp_path), None, {"step": 1})
        saved = first.call("get_state_dict")[0]
        first.call_each("sft_step", shards)
        expected = first.call("get_state_dict")[0]
    with learners(2, tiny_llama, zero_stage=3, micro_batch_size=2) as second:
        assert second.call("load_checkpoint", str(tmp_path)) == [{"step": 1}] * 2
        assert max_diff(second.call("get_state_dict")[0], saved) == 0.0
        second.call_each("sft_step", shards)
        assert max_diff(second.call("get_state_dict")[0], expected) <= 1e-7


# --------------------------------------------------------------------------- reward model


def test_reward_model_trains(ray_local, tiny_rm):
    from transformers import AutoModelForSequenceClassification

    chosen, rejected = make_batch(6, seed=8), make_batch(6, seed=9)
    pref = PreferenceBatch(chosen, rejected)
    with learners(1, tiny_rm, model_kind="reward", micro_batch_size=4, zero_stage=2,
                  offload=True) as group:
        scores = group.call("forward_scores", chosen)[0]
        hf = AutoModelForSequenceClassification.from_pretrained(tiny_rm, dtype=torch.float32)
        with torch.no_grad():  # no pad id inside the rows: HF pools the same last token
            expected = hf(input_ids=chosen.input_ids, attention_mask=chosen.attention_mask).logits
        assert float((scores - expected[:, 0]).abs().max()) <= 1e-5
        first = group.call("rm_step", pref, margin=0.0)[0]
        for _ in range(4):
            m = group.call("rm_step", pref)[0]
        assert all(math.isfinite(v) for v in m.values())
        assert m["rm/loss"] < first["rm/loss"] and m["rm/accuracy"] == pytest.approx(1.0)
        assert m["rm/margin"] > first["rm/margin"]
        assert float((group.call("forward_scores", chosen)[0] - scores).abs().max()) > 1e-3
        assert group.call("evaluate", pref, "rm")[0]["eval/accuracy"] == pytest.approx(1.0)
        with pytest.raises(WorkerError, match="model_kind='causal_lm'"):
            group.call("sft_step", chosen)


def shared_prompt_pairs(n: int, seed: int) -> PreferenceBatch:
    """n pairs whose two responses follow the same prompt (as preference data has them)."""
    from rlhf_ray.driver.batches import preference_batch

    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(100, 1000, (k,), generator=g).tolist()

    return preference_batch([(ids(4, 9), ids(1, 6), ids(1, 6)) for _ in range(n)], PAD)


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_shared_prompt_steps_equal_two_row_steps_on_two_ranks(ray_local, tiny_rm, tiny_llama, kind):
    """``learner.shared_prompt`` (each pair's prompt computed once) is an exact rewrite: on two
    ZeRO-2 ranks with two micro-batches each, one step of the reward-model or DPO loss gives
    the metrics and the weights that the two-row forward gives."""
    batch = shared_prompt_pairs(8, seed=11)
    assert batch.shared_prompt(PAD) is not None
    if kind == "dpo":
        batch.ref_chosen_logps = -torch.linspace(20, 30, 8)
        batch.ref_rejected_logps = -torch.linspace(25, 22, 8)
    path, model_kind = (tiny_rm, "reward") if kind == "rm" else (tiny_llama, "causal_lm")
    results = []
    for shared in (True, False):
        with learners(2, path, model_kind=model_kind, zero_stage=2, micro_batch_size=4,
                      shared_prompt=shared) as group:
            extra = (0.0, 8) if kind == "rm" else (0.1, "sigmoid", 0.0, 8)  # 8 pairs in all
            metrics = group.call_each(f"{kind}_step", [(s, *extra) for s in batch.shards(2)])[0]
            results.append((metrics, group.call("get_state_dict")[0]))
    (shared_m, shared_w), (rows_m, rows_w) = results
    loss = f"{kind}/loss"
    assert shared_m[loss] == pytest.approx(rows_m[loss], abs=1e-5)
    assert shared_m["policy/grad_norm" if kind == "dpo" else "rm/grad_norm"] == pytest.approx(
        rows_m["policy/grad_norm" if kind == "dpo" else "rm/grad_norm"], rel=1e-4)
    assert shared_m["perf/tokens"] < rows_m["perf/tokens"]  # the prompts computed once
    # Adam's first step moves a weight by about lr (1e-3) whatever its gradient's size, so
    # float noise in a near-zero gradient shows at up to a percent of that
    assert max_diff(shared_w, rows_w) <= 1e-5


def grpo_groups(prompts: int, n: int, seed: int) -> ExperienceBatch:
    """``prompts`` groups of ``n`` samples (rows of a group share the prompt, as rollouts
    give them), with advantages, rollout and reference log-probs: an on-policy GRPO batch
    (no old log-probs: pi_old is the update's own forward)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(100, 1000, (k,), generator=g).tolist()

    pairs = []
    for _ in range(prompts):
        prompt = ids(4, 9)
        pairs += [(prompt, ids(1, 8)) for _ in range(n)]
    batch = SequenceBatch.from_pairs(pairs, PAD)
    mask = batch.response_mask
    noise = torch.randn(mask.shape, generator=g)
    return ExperienceBatch(**batch.tensors(), rollout_logprobs=(-2.0 + 0.1 * noise) * mask,
                           ref_logprobs=(-2.0 - 0.2 * noise) * mask,
                           advantages=torch.randn(len(batch), 1, generator=g) * mask)


def test_shared_prompt_grpo_step_equals_one_row_per_sample_on_two_ranks(ray_local, tiny_llama):
    """``learner.shared_prompt`` on GRPO groups (a prompt's samples in one row, the prompt
    computed once) is an exact rewrite: on two ZeRO-2 ranks, each with two micro-batches of
    one group, the pi_old pass gives the same log-probs and one on-policy step with the KL
    in the loss and the rollout correction gives the same metrics and weights as one row per
    sample (in the "linear" optimizer regime, where the weights show the gradient itself)."""
    batch = grpo_groups(4, 4, seed=5)
    settings = PPOLossSettings(kl_coef=0.04, kl_estimator="k3", rollout_correction="tis",
                               kl_metric_estimator="k1", temperature=0.9)
    results = []
    for shared in (True, False):
        with learners(2, tiny_llama, zero_stage=2, micro_batch_size=4, shared_prompt=shared,
                      optim=optim_config(**REGIMES["linear"])) as group:  # weights move by lr * grad
            logprobs = torch.cat(group.call_each("forward_logprobs", [(s, 0.9) for s in batch.shards(2)]))
            metrics = group.call_each("ppo_step", [(s, settings) for s in batch.shards(2)])[0]
            results.append((logprobs, metrics, group.call("get_state_dict")[0]))
    (shared_lp, shared_m, shared_w), (rows_lp, rows_m, rows_w) = results
    mask = batch.response_mask
    assert masked_max_diff(shared_lp, rows_lp, mask) <= 1e-5
    assert float((shared_lp * (1 - mask)).abs().max()) == 0.0  # prompt positions: not computed
    for key in ("policy/loss", "kl/ref", "kl/mean", "policy/entropy", "rollout/mismatch_kl",
                "rollout/is_weight_mean"):
        assert shared_m[key] == pytest.approx(rows_m[key], rel=1e-5, abs=1e-6), key
    assert shared_m["policy/grad_norm"] == pytest.approx(rows_m["policy/grad_norm"], rel=1e-4)
    assert shared_m["perf/tokens"] < rows_m["perf/tokens"]  # each prompt once, not four times
    assert max_diff(shared_w, rows_w) <= 1e-5


# --------------------------------------------------------------------------- failures


def test_missing_model_path_names_role_and_path(ray_local, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with learners(1, missing, init=False) as group:
        with pytest.raises(WorkerError) as info:
            group.call("init")
    assert info.value.role == "learner" and "learner" in str(info.value)
    assert missing in str(info.value)



SHM_SCRIPT = """
import glob, os, sys
from rlhf_ray.config import LearnerConfig, OptimConfig
from rlhf_ray.workers.learner import LearnerWorker
learner = LearnerWorker(sys.argv[1], LearnerConfig(), OptimConfig())
learner.init()
print("during", sorted(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")))
learner.shutdown()
print("after", sorted(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")))
"""


def test_shutdown_removes_the_shm_buffer_it_created(tiny_llama):
    """With LOCAL_SIZE == world size (as under the deepspeed launcher) DeepSpeed creates a
    66 MB shm allreduce buffer per rank; shutdown() removes it. A lone learner, no Ray."""
    env = {**os.environ, "LOCAL_SIZE": "1"}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, "-c", SHM_SCRIPT, tiny_llama], env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                 if line.startswith(("during", "after")))
    during, after = ast.literal_eval(lines["during"]), ast.literal_eval(lines["after"])
    created = set(during) - set(after)
    assert len(created) == 1 and f"_{os.getuid()}_127.0.0.1_" in created.pop()


# --------------------------------------------------------------------------- pure parts


def test_lr_schedule_warmup_then_decay():
    cosine = lr_schedule(OptimConfig(warmup_steps=2, schedule="cosine"), total_steps=6)
    assert [round(cosine(s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    linear = lr_schedule(OptimConfig(schedule="linear"), total_steps=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_schedule(OptimConfig(), None)(10**6) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        lr_schedule(OptimConfig(schedule="cosine"), None)


def test_ds_config_refuses_offload_without_zero():
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        ds_config(LearnerConfig(zero_stage=0, offload=True), OptimConfig(), "float32")
    cfg = ds_config(LearnerConfig(zero_stage=3, offload=True), OptimConfig(), "bfloat16")
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu" and cfg["bf16"]["enabled"]
