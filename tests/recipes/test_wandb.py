"""W&B as users expect it: the resolved config, project/group/name/tags from config, a
samples table every `logging.samples_every` steps and system metrics, read back from the
offline run file with W&B's own record format (tests/helpers/wandb_log.py)."""

from __future__ import annotations

import json

from wandb_log import read_run


def test_offline_run_holds_config_metrics_samples_table_and_system_metrics(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    summary = tiny_run("ppo", run_dir, "logging.wandb_mode=offline", "logging.group=sweep-a",
                       "logging.tags=[tiny, grpo]", "logging.samples_every=1",
                       "logging.samples_per_table=3", "kl.coef=0.02")
    logged = read_run(run_dir)
    # the resolved config, every section of it
    assert logged["config"]["kl"]["coef"] == 0.02 and logged["config"]["logging"]["group"] == "sweep-a"
    assert logged["config"]["reward"]["url_token_env"] == "RLHF_RAY_REWARD_TOKEN"
    assert logged["group"] == "sweep-a" and logged["tags"] == ["tiny", "grpo"]
    keys = set().union(*logged["history"])
    for key in ("reward/mean", "kl/mean", "policy/loss", "perf/sync_s", "perf/sync_gb_per_s",
                "rollout/ledger_trained", "eval/score"):
        assert key in keys, f"{key} not in the W&B history: {sorted(keys)}"
    # one samples table per step (steps=3 in ppo_tiny), each a table file W&B wrote
    tables = [row["samples/episodes"] for row in logged["history"] if "samples/episodes" in row]
    assert len(tables) == 3 and all(t["_type"] == "table-file" and t["nrows"] == 3 for t in tables)
    media = logged["file"].parent / "files"
    table = json.loads((media / tables[-1]["path"]).read_text())
    assert table["columns"] == ["step", "prompt", "response", "reward", "kl", "version"]
    assert len(table["data"]) == 3 and all(isinstance(r[3], float) for r in table["data"])
    # the same rows, without W&B, in samples.jsonl
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["step"] for r in rows} == {1, 2, 3}
    assert logged["stats"] > 0  # system metrics were sampled
    assert summary["wandb_dir"]
