"""The run lifecycle every recipe shares (``rlhf_ray.driver.run.Run``): refusals before
anything is written, workers shut down in reverse on an error and on SIGTERM, and resume
for the recipes that keep checkpoints (rs here; sft, rm, dpo and ppo in their own tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray

from rlhf_ray.config import PrefsConfig, RewardConfig
from rlhf_ray.config_loader import ConfigError, build_config
from rlhf_ray.driver.run import Run


@pytest.mark.parametrize("recipe", ["prefs", "generate", "doctor"])
def test_recipes_without_checkpoints_refuse_resume_before_writing(tiny_cfg, tmp_path, recipe):
    import importlib

    cfg = tiny_cfg(recipe, tmp_path / "run", "resume=auto") if recipe != "doctor" else \
        build_config(importlib.import_module("rlhf_ray.recipes").RECIPES["doctor"], None,
                     [f"run_dir={tmp_path / 'run'}", "resume=auto"])
    with pytest.raises(ConfigError, match=f"resume=auto: {recipe} .*(keeps no checkpoints|nothing to resume)"):
        importlib.import_module(f"rlhf_ray.recipes.{recipe}").run(cfg)
    assert not (tmp_path / "run").exists()


def test_the_pipeline_refuses_resume_in_its_config():
    from rlhf_ray.config import PipelineConfig

    with pytest.raises(ConfigError, match="resume=auto: the pipeline keeps no checkpoints"):
        build_config(PipelineConfig, None, ["resume=auto"])


def _dies_within(actor, seconds: float) -> bool:
    """``ray.kill`` is asynchronous: a call sent right after it may still be served. Keep
    calling until the actor is reported dead, or give up after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.health.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.5)
    return False


def test_an_error_shuts_down_every_worker_the_run_started(ray_local, tmp_path):
    cfg = build_config(PrefsConfig, None, [f"run_dir={tmp_path}", "logging.wandb_mode=disabled",
                                           "logging.progress_bar=false"])
    with pytest.raises(RuntimeError, match="boom"):
        with Run(cfg, "prefs", resumable=None) as run:
            first = run.roles.reward(RewardConfig(function="arithmetic"))
            second = run.roles.reward(RewardConfig(function="arithmetic", num_replicas=2))
            actors = first.workers + second.workers
            assert all(ray.get(a.health.remote(), timeout=60) for a in actors)
            raise RuntimeError("boom")
    assert run.roles.groups == []
    for actor in actors:
        assert _dies_within(actor, seconds=60), "a worker the run started outlived the run"
    assert (tmp_path / "config.yaml").is_file() and not (tmp_path / "summary.json").exists()


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    from rlhf_ray.config import PrefsConfig, RewardConfig
    from rlhf_ray.config_loader import build_config
    from rlhf_ray.driver.run import Run

    cfg = build_config(PrefsConfig, None, [f"run_dir={sys.argv[1]}", "logging.wandb_mode=disabled",
                                           "ray.num_cpus=1", "ray.object_store_mb=128",
                                           "ray.log_to_driver=false"])
    with Run(cfg, "prefs", resumable=None) as run:
        reward = run.roles.reward(RewardConfig(function="arithmetic"))
        print("ready", reward.call("node_info")[0]["pid"], flush=True)
        time.sleep(600)
""")


def test_sigterm_unwinds_the_run_and_stops_its_workers_and_ray(tmp_path):
    """A job stop or a scheduler sends SIGTERM: the run exits 143, its worker processes and
    its private Ray are gone, and no summary claims a finished run."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ), start_new_session=True)
    try:
        line = ""
        deadline = time.time() + 240
        while time.time() < deadline and not line.startswith("ready"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("ready"), proc.stderr.read()[-3000:]
        worker_pid = int(line.split()[1])
        session = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        deadline = time.time() + 30
        while time.time() < deadline and any(psutil.pid_exists(p) for p in session | {worker_pid}):
            time.sleep(0.5)
        alive = [p for p in session | {worker_pid} if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"left running after SIGTERM: {alive}"
        assert (tmp_path / "run" / "config.yaml").is_file()
        assert not (tmp_path / "run" / "summary.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_rs_resumes_at_the_next_round_with_its_outputs(tiny_run, tmp_path):
    first = tiny_run("rs", tmp_path, "rounds=1", "checkpoint.save_every=1")
    assert first["start_round"] == 0 and first["outputs"]["checkpoint"].endswith("step_00000001")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        tiny_run("rs", tmp_path, "rounds=2")
    with pytest.raises(ConfigError, match="differs .* in threshold"):
        tiny_run("rs", tmp_path, "rounds=2", "resume=auto", "threshold=0.5")
    resumed = tiny_run("rs", tmp_path, "rounds=2", "resume=auto")
    assert resumed["start_round"] == 1 and resumed["resumed_from"].endswith("step_00000001")
    # both rounds' outputs are in the summary, the first carried over by the checkpoint
    assert {"kept_round0", "kept_round1", "pairs_round0", "pairs_round1"} <= set(resumed["outputs"])
    logged = [json.loads(x) for x in open(resumed["outputs"]["metrics"])]
    assert [r["step"] for r in logged if "rs/kept" in r] == [1, 2]
    assert resumed["metrics"]["sync/version"]["final"] == 2
    assert resumed["metrics"]["eval/score"]["first"] == first["metrics"]["eval/score"]["first"]


def test_roles_started_together_are_waited_for_at_the_block_end(ray_local, tmp_path):
    """Inside ``roles.together()`` a role's method launches its workers and returns; the
    block's end waits for every group, in order. A role that fails to start raises its own
    error there, and every group the block launched is stopped with the run."""
    cfg = build_config(PrefsConfig, None, [f"run_dir={tmp_path / 'ok'}", "logging.wandb_mode=disabled",
                                           "logging.progress_bar=false"])
    with Run(cfg, "prefs", resumable=None) as run:
        with run.roles.together():
            first = run.roles.reward(RewardConfig(function="arithmetic"))
            second = run.roles.reward(RewardConfig(function="arithmetic", num_replicas=2))
            assert len(first) == 0 and len(second) == 0  # launched, not yet waited for
            with pytest.raises(RuntimeError, match="reward.health: its workers are still starting"):
                first.call("health")
        assert len(first) == 1 and len(second) == 2
        assert [p["rank"] for p in run.roles.placements["reward"]] == [0, 0, 1]
        assert all(ray.get(a.health.remote(), timeout=60) for a in first.workers + second.workers)

    cfg = build_config(PrefsConfig, None, [f"run_dir={tmp_path / 'bad'}", "logging.wandb_mode=disabled",
                                           "logging.progress_bar=false"])
    with pytest.raises(Exception, match="no_such_function") as info:
        with Run(cfg, "prefs", resumable=None) as run:
            with run.roles.together():
                good = run.roles.reward(RewardConfig(function="arithmetic", num_replicas=2))
                run.roles.reward(RewardConfig(function="reward_fns:no_such_function"))
                launched = list(good._starting[0])
    assert "reward" in str(info.value)
    assert run.roles.groups == []
    for actor in launched:  # the healthy group, launched beside the broken one, is stopped too
        assert _dies_within(actor, seconds=60), "a worker the block launched outlived the run"

    # the local Ray's CPUs count the groups still starting: a group that cannot fit beside
    # them is refused at once, not left waiting for its start timeout
    from rlhf_ray.runtime import ClusterError

    cfg = build_config(PrefsConfig, None, [f"run_dir={tmp_path / 'full'}", "logging.wandb_mode=disabled",
                                           "logging.progress_bar=false"])
    total = ray.cluster_resources()["CPU"]
    with pytest.raises(ClusterError, match=f"{total - 1:g} of them already held by this run's other workers"):
        with Run(cfg, "prefs", resumable=None) as run:
            with run.roles.together():
                run.roles.reward(RewardConfig(function="arithmetic", cpus_per_replica=total - 1))
                run.roles.reward(RewardConfig(function="arithmetic", cpus_per_replica=2))
    assert run.roles.groups == []

    # an error inside the block: the workers launched and never waited for are killed too
    cfg = build_config(PrefsConfig, None, [f"run_dir={tmp_path / 'raised'}", "logging.wandb_mode=disabled",
                                           "logging.progress_bar=false"])
    with pytest.raises(RuntimeError, match="boom"):
        with Run(cfg, "prefs", resumable=None) as run:
            with run.roles.together():
                pending = run.roles.reward(RewardConfig(function="arithmetic", num_replicas=2))
                launched = list(pending._starting[0])
                raise RuntimeError("boom")
    assert run.roles.groups == [] and pending._starting is None
    for actor in launched:
        assert _dies_within(actor, seconds=60), "a launched worker outlived the run"
