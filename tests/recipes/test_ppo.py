"""The streaming PPO driver on the tiny model: invariants of versions, grouping, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.config import PPOConfig
from rlhf_ray.config_loader import build_config
from rlhf_ray.workers.decode_attention import unavailable

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "ppo_tiny.yaml"


def run_ppo(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    from rlhf_ray.recipes import ppo

    cfg = build_config(PPOConfig, TINY, [f"run_dir={tmp_path}", "logging.progress_bar=false", *overrides])
    summary = ppo.run(cfg)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    return summary, history


def test_grpo_on_policy_every_episode_has_the_current_version(ray_local, tmp_path):
    # one update per batch with the KL in the loss: pi_old is the update's own forward
    summary, history = run_ppo(tmp_path, "advantage=grpo", "max_staleness=0", "steps=3",
                               "rollout.num_workers=2", "kl.mode=loss")
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert h["versions_trained"] == [h["trained_at_version"]], h
        assert h["rollout/dropped_stale"] == 0
        assert h["rollout/episodes"] == 4 * 2  # prompts_per_step x sampling.n
    m = summary["metrics"]
    for key in ("perf/gen_s", "perf/score_s", "perf/train_s", "perf/sync_s", "perf/step_s",
                "perf/tokens_per_s", "reward/mean", "kl/mean", "policy/loss", "eval/score",
                "rollout/mismatch_kl", "rollout/is_weight_mean"):
        assert key in m, key
    # the learners applied the rollout correction: vLLM and the learner agree closely
    assert 0.9 < m["rollout/is_weight_mean"]["final"] < 1.1 and m["rollout/mismatch_kl"]["final"] < 0.01
    assert m["policy/ratio_mean"]["final"] == pytest.approx(1.0, abs=1e-5)
    assert m["sync/version"]["final"] == 3
    assert Path(summary["outputs"]["plot"]).stat().st_size > 1000
    # rollout.kv_cache_gib null: the engine's cache is sized for the tiny model (64 MiB), not 1 GiB
    assert summary["rollout_engine"]["kv_cache_gib"] == 0.0625
    # the project's CPU kernel ran, where the machine can run it (a C compiler, AVX-512)
    kernel = summary["rollout_engine"]["decode_attention"]
    assert kernel == "rlhf_ray" if unavailable() is None else kernel.startswith("vllm (")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["outputs"]["model"])  # the exported policy loads


def test_rloo_with_staleness_one_runs_ahead_but_within_bound(ray_local, tmp_path):
    summary, history = run_ppo(tmp_path, "advantage=rloo", "max_staleness=1", "steps=3", "kl.mode=loss",
                               "kl.loss_estimator=k3")
    assert len(history) == 3
    for h in history:
        assert all(h["trained_at_version"] - v <= 1 for v in h["versions_trained"]), h
        # every step trains on all of its prompts; the ledger counts them as they go
        assert h["rollout/episodes"] == 4 * 2 and h["rollout/ledger_trained"] == h["step"] * 4 * 2
    # the episode ledger reconciles: nothing lost, nothing left over
    ledger = summary["episode_ledger"]
    assert ledger["prompts_submitted"] == ledger["prompts_collected"] == 3 * 4
    assert ledger["trained"] == ledger["collected"] == 3 * 4 * 2
    assert ledger["generated"] == ledger["scored"] == ledger["collected"] + ledger["dropped_stale"]
    assert ledger["dropped_stale"] == 2 * ledger["prompts_requeued"]
    assert ledger["prompts_pending"] == ledger["scoring"] == ledger["waiting"] == 0
    # generation really ran ahead: some step trained on episodes one version old
    assert any(min(h["versions_trained"]) == h["trained_at_version"] - 1 for h in history)


def test_gae_with_value_warmup_and_resume_mid_run(ray_local, tmp_path):
    # a reward with signal: with the tiny model's all-zero arithmetic scores and pi_old equal
    # to the reference, the returns (and so the critic's gradient) would be exactly zero
    args = ("advantage=gae", "value_warmup_steps=1", "kl.adaptive=true", "kl.target=0.5",
            "reward.function=reward_fns:response_length")
    first, history = run_ppo(tmp_path, *args, "steps=2", "checkpoint.save_every=1")
    assert "value/loss" in first["metrics"]
    assert [h["step"] for h in history] == [1, 2]
    # step 1 trains only the critic; the policy joins at step 2
    assert [h["policy/trained"] for h in history] == [0.0, 1.0]
    assert "policy/grad_norm" not in history[0] and history[0]["value/grad_norm"] > 0
    resumed, history = run_ppo(tmp_path, *args, "steps=3", "resume=auto")
    assert [h["step"] for h in history] == [1, 2, 3], "the resumed run keeps its history"
    assert resumed["final_version"] == 3
    assert history[2]["trained_at_version"] == 2 and history[2]["policy/trained"] == 1.0
    assert resumed["metrics"]["value/loss"]["first"] == first["metrics"]["value/loss"]["first"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "value/loss" in r] == [1, 2, 3]
    # neither starting over the checkpoints nor resuming with other settings is allowed
    from rlhf_ray.config_loader import ConfigError

    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_ppo(tmp_path, *args, "steps=4")
    with pytest.raises(ConfigError, match="differs .* in optim.lr"):
        run_ppo(tmp_path, *args, "steps=4", "resume=auto", "optim.lr=0.5")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(logged)  # untouched


def test_groups_are_checked():
    from rlhf_ray.batch import Episode
    from rlhf_ray.driver.episodes import check_groups

    def ep(p, k):
        return Episode([1], [2], "", "", [0.0], "stop", 0, prompt_index=p, sample_index=k)

    check_groups([ep(0, 0), ep(0, 1), ep(1, 0), ep(1, 1)], 2)
    with pytest.raises(RuntimeError, match="not one prompt's 2 samples"):
        check_groups([ep(0, 0), ep(1, 0), ep(0, 1), ep(1, 1)], 2)


def test_reinforce_pp_and_bad_settings(ray_local, tmp_path):
    summary, history = run_ppo(tmp_path, "advantage=reinforce++", "steps=1")
    assert summary["final_version"] == 1 and history[0]["rollout/episodes"] == 8
    from rlhf_ray.config_loader import ConfigError

    with pytest.raises(ConfigError, match="needs sampling.n >= 2"):
        build_config(PPOConfig, TINY, ["advantage=grpo", "sampling.n=1"])
    with pytest.raises(ConfigError, match="max_staleness"):
        build_config(PPOConfig, TINY, ["max_staleness=-1"])
    with pytest.raises(ConfigError, match="eval_samples: expected >= 0"):
        build_config(PPOConfig, TINY, ["eval_samples=-2"])


def test_rollout_workers_scale_out_and_in_while_the_job_runs(ray_local, tmp_path):
    """`rlhf-ray scale` (another process) takes a running job's rollout workers 1 -> 2 -> 1:
    the new worker gets the current weights before any chunk, the removed one drains its
    chunks first, and the ledger accounts for every prompt."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from rlhf_ray.driver.scaling import NAMESPACE, control_name

    run_dir = tmp_path / "scaled"
    address = ray_local.get_runtime_context().gcs_address
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(result=run_ppo(run_dir, "steps=6", "chunk_size=1")))
    thread.start()

    def scale(n: int, run: str = "scaled") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "scale", "--address", address,
                               "--run", run, "--rollout", str(n)], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ))

    def workers_logged() -> list[float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["rollout/num_workers"] for r in rows if "rollout/num_workers" in r]

    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the job's control actor exists
        try:
            ray_local.get_actor(control_name("scaled"), namespace=NAMESPACE)
            break
        except ValueError:
            time.sleep(1)
    out = scale(2)
    assert out.returncode == 0, out.stderr[-2000:]
    while time.time() < deadline and 2.0 not in workers_logged() and thread.is_alive():
        time.sleep(0.2)
    out = scale(1)
    assert out.returncode == 0, out.stderr[-2000:]
    thread.join(timeout=600)
    summary, history = done["result"]
    workers = [h["rollout/num_workers"] for h in history]
    assert 2.0 in workers[:-1] and workers[-1] == 1.0, workers  # 1 -> 2 -> 1
    for h in history:  # new workers got the current weights: still strictly on-policy
        assert h["versions_trained"] == [h["trained_at_version"]]
        assert h["rollout/dropped_stale"] == 0
    ledger = summary["episode_ledger"]
    assert ledger["prompts_submitted"] == ledger["prompts_collected"] == 6 * 4
    assert ledger["trained"] == ledger["collected"] == ledger["generated"] == 6 * 4 * 2
    assert len(json.loads((run_dir / "workers.json").read_text())["rollout"]) == 1
    bad = scale(2, run="no-such-run")
    assert bad.returncode == 1 and "no running job named 'no-such-run'" in bad.stderr


def test_dapo_and_dr_grpo_options_run_and_the_ledger_counts_filtered_groups(ray_local, tmp_path):
    """Dynamic sampling (zero-variance groups left out, refilled), the overlong soft penalty,
    Dr. GRPO (no group std, constant normaliser) and an entropy bonus, end to end."""
    summary, history = run_ppo(tmp_path, "steps=2", "reward.function=reward_fns:response_length",
                               "dynamic_sampling=true", "overlong=soft_penalty", "overlong_buffer=4",
                               "grpo.normalize_std=false", "loss_aggregation=seq_mean_token_sum_norm",
                               "entropy_coef=0.01", "sampling.max_new_tokens=8")
    for h in history:
        assert 0.0 <= h["rollout/zero_variance_frac"] <= 1.0
        assert h["reward/overlong_penalty_mean"] <= 0.0
        assert h["rollout/trained_groups"] * 2 == h["rollout/episodes"] <= 4 * 2
        assert h["policy/entropy"] > 0 and h["policy/loss"] == h["policy/loss"]
    ledger = summary["episode_ledger"]
    assert ledger["trained"] + ledger["filtered"] == ledger["collected"]
    assert ledger["filtered"] == sum(2 * h["rollout/filtered_groups"] for h in history)


def test_bf16_rollouts_fp32_learner_the_mismatch_is_measured_and_corrected(ray_local, tmp_path):
    """vLLM samples in bf16, the learners train in fp32. pi_old is recomputed by the learners,
    so the first update starts on-policy (nothing clipped) while the engine mismatch shows up
    in rollout/mismatch_kl and the importance weights; GSPO and REINFORCE++-baseline run."""
    args = ("steps=1", "reward.function=reward_fns:response_length", "advantage=reinforce++-baseline",
            "policy_loss=gspo", "clip_eps=3e-4", "clip_eps_high=4e-4", "sampling.seed=3")
    _, history = run_ppo(tmp_path / "bf16", *args, "rollout.dtype=bfloat16")
    _, same = run_ppo(tmp_path / "fp32", *args)  # the control: both engines in fp32
    first = history[0]
    assert first["rollout/mismatch_kl"] > 100 * max(same[0]["rollout/mismatch_kl"], 1e-12)
    assert first["rollout/is_weight_mean"] != 1.0
    assert first["policy/clip_frac"] == 0.0 and first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= first["rollout/is_clipped_frac"] <= 1.0
    print("bf16 rollouts, fp32 learner, step 1:", {k: first[k] for k in (
        "rollout/mismatch_kl", "rollout/is_weight_mean", "rollout/is_clipped_frac",
        "policy/clip_frac", "policy/ratio_mean")})


def test_grpo_with_the_calculator_environment_through_the_cli(ray_local, tmp_path):
    """Multi-turn episodes end to end: `rlhf-ray ppo ... env.name=calculator` trains on the
    environment's scores (no reward server), logs env/* and reconciles the ledger."""
    from rlhf_ray import cli

    code = cli.main(["ppo", str(TINY), f"run_dir={tmp_path}", "logging.progress_bar=false", "steps=2",
                     "env.name=calculator", "env.max_turns=2", "env.kwargs={instructions: true}"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert 1 <= h["env/turns_mean"] <= 2 and h["env/errors"] == 0 and h["env/policy_tokens_mean"] > 0
        assert h["rollout/episodes"] == 4 * 2 and "policy/loss" in h
    assert summary["workers"].get("reward") in (None, [])  # the environment scores; no RewardServer
    assert summary["episode_ledger"]["trained"] == summary["episode_ledger"]["collected"] == 2 * 4 * 2
    assert "eval/turns_mean" in summary["metrics"]


def test_gae_with_per_turn_rewards_from_a_scripted_environment(ray_local, tmp_path):
    """PPO with a value model on three-turn episodes: each turn's reward (0.1, 0.2, 0.3) sits
    on the turn's last policy token and GAE steps over the environment's tokens."""
    summary, history = run_ppo(tmp_path, "advantage=gae", "steps=2", "env.name=scripted_envs:Scripted",
                               "env.kwargs={turns: 3}")
    for h in history:
        assert h["env/turns_mean"] == 3 and h["env/tool_calls"] == 2 * 4 * 2
        assert h["reward/mean"] == pytest.approx(0.6) and "value/loss" in h
        assert h["env/env_tokens_mean"] > 0
        # the DeepSpeed learners' pi_old and vLLM's sampling log-probs agree on policy tokens
        assert h["rollout/mismatch_kl"] < 1e-4 and abs(h["rollout/is_weight_mean"] - 1) < 1e-3
    assert summary["episode_ledger"]["trained"] == 2 * 4 * 2
