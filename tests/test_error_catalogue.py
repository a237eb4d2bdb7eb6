"""The catalogue of bad inputs (docs/errors.md): each case runs the real CLI on the tiny models.

Every case checks three things:
- the exit code is not 0;
- the one message the CLI prints on stderr names what is wrong (file, row, field, key,
  worker or address) and what was expected;
- nothing already on disk is lost or corrupted (files that existed keep their bytes, a
  checkpoint stays loadable).

Most cases fail before Ray starts. Those that need workers share the session's local Ray
(``ray_local``); only the signal and the unreachable-address cases run the CLI in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from rlhf_ray import checkpoint, files
from rlhf_ray.cli import main
from rlhf_ray.config_loader import build_config, save_config
from rlhf_ray.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
QUIET = ["logging.wandb_mode=disabled", "logging.progress_bar=false"]
STEP1, STEP2 = "step_00000001", "step_00000002"


def run_cli(capsys, *args) -> tuple[int, str]:
    """``rlhf-ray ARGS`` in this process: (exit code, the message the user reads)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse refusals exit
        code = e.code
    err = capsys.readouterr().err
    # Worker logs may share stderr; the CLI's own message is the last "error:" line.
    starts = [i for i, line in enumerate(err.splitlines())
              if line.startswith(("error:", "config error:", "rlhf-ray: error:"))]
    message = "\n".join(err.splitlines()[starts[-1]:]) if starts else err
    print(f"MESSAGE {message}")  # shown by `pytest -rP`, for docs/errors.md
    return code, message


def expect(code, message: str, *needles: str, exit_code: int | None = None) -> None:
    assert code != 0, f"exit code 0; stderr: {message}"
    if exit_code is not None:
        assert code == exit_code, message
    assert "Traceback" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"


def sft(tmp_path: Path, *overrides: str) -> list[str]:
    return ["sft", CONFIGS / "sft_tiny.yaml", f"run_dir={tmp_path / 'run'}", *QUIET, *overrides]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- config


def test_typo_in_nested_yaml_key_suggests_the_closest(capsys, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("learner:\n  zero_stag: 1\n")
    before = config.read_bytes()
    code, message = run_cli(capsys, "sft", config, f"run_dir={tmp_path / 'run'}")
    expect(code, message, "unknown key 'learner.zero_stag'", "Did you mean 'learner.zero_stage'?",
           str(config), exit_code=2)
    assert config.read_bytes() == before and not (tmp_path / "run").exists()


def test_wrong_type_names_the_key_and_the_type(capsys, tmp_path):
    code, message = run_cli(capsys, *sft(tmp_path, "epochs=two"))
    expect(code, message, "epochs: expected an integer, got 'two'", exit_code=2)
    assert not (tmp_path / "run").exists()


def test_enum_out_of_range_lists_the_choices(capsys, tmp_path):
    code, message = run_cli(capsys, *sft(tmp_path, "learner.zero_stage=5"))
    expect(code, message, "learner.zero_stage: 5 is not one of 0 | 1 | 2 | 3", exit_code=2)


def test_missing_config_file_is_named(capsys, tmp_path):
    code, message = run_cli(capsys, "sft", tmp_path / "nope.yaml")
    expect(code, message, f"config file {tmp_path / 'nope.yaml'} does not exist", exit_code=2)


def test_unknown_recipe_lists_the_commands(capsys):
    code, message = run_cli(capsys, "sfft", "epochs=1")
    expect(code, message, "invalid choice: 'sfft'", "sft", "dpo", exit_code=2)


# --------------------------------------------------------------------------- model folders


def test_missing_model_folder_names_role_and_path(capsys, tmp_path):
    code, message = run_cli(capsys, *sft(tmp_path, f"model.path={tmp_path / 'nope'}"))
    expect(code, message, f"sft model: model path '{tmp_path / 'nope'}' does not exist",
           "expected a Hugging Face folder or one of smollm2-135m-instruct, tiny-llama", exit_code=1)
    assert not (tmp_path / "run").exists()


def test_truncated_safetensors_is_refused_before_any_worker(capsys, tmp_path, tiny_llama):
    model = tmp_path / "cut"
    shutil.copytree(tiny_llama, model)
    weights = model / "model.safetensors"
    full = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(full // 2)
    code, message = run_cli(capsys, *sft(tmp_path, f"model.path={model}"))
    expect(code, message, f"model path '{model}': model.safetensors is truncated",
           f"{full // 2} bytes, but its header says {full}", "expected a complete safetensors file",
           exit_code=1)
    assert weights.stat().st_size == full // 2  # the folder is reported, never "repaired"


def test_chat_template_with_a_tokenizer_that_has_none(capsys, tmp_path, tiny_llama):
    model = tmp_path / "nochat"
    model.mkdir()
    for item in Path(tiny_llama).iterdir():
        if item.name == "model.safetensors":
            (model / item.name).symlink_to(item)
        elif item.name != "chat_template.jinja":
            shutil.copy(item, model / item.name)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    code, message = run_cli(capsys, *sft(tmp_path, f"model.path={model}", "data.template=chat"))
    expect(code, message, f"data.template=chat, but the tokenizer in {model} has no chat template",
           "use data.template=alpaca", exit_code=1)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- data


def test_prompt_longer_than_max_model_len_names_the_row(capsys, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "What is 2 + 3?", "answer": "5"},
        {"prompt": "Repeat: " + "apple banana cherry " * 40, "answer": "x"}])
    code, message = run_cli(capsys, "generate", CONFIGS / "generate_tiny.yaml",
                            f"run_dir={tmp_path / 'run'}", *QUIET, f"data.source={prompts}",
                            "split=all", "rollout.max_model_len=64")
    expect(code, message, f"{prompts}: row 2: field 'prompt' is too long",
           "expected fewer than rollout.max_model_len - 1 = 63", exit_code=1)


def test_dataset_empty_after_filtering_says_what_dropped_it(capsys, tmp_path):
    code, message = run_cli(capsys, *sft(tmp_path, "data.max_length=8", "data.skip_invalid=true"))
    expect(code, message, "arithmetic: has no valid rows left (48 read, 48 dropped",
           "48 longer than data.max_length=8", "row 1: field 'instruction' is too long",
           "expected at least one row", exit_code=1)
    assert not (tmp_path / "run").exists()


def test_preference_pair_whose_chosen_equals_rejected(capsys, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
        {"prompt": "Pick a colour.", "chosen": "Blue.", "rejected": "Blue."}])
    before = pairs.read_bytes()
    code, message = run_cli(capsys, "dpo", CONFIGS / "dpo_tiny.yaml", f"run_dir={tmp_path / 'run'}",
                            *QUIET, f"data.source={pairs}")
    expect(code, message, f"{pairs}: row 2: field 'rejected' is identical to 'chosen'",
           "expected two different responses", "data.skip_invalid=true", exit_code=1)
    assert pairs.read_bytes() == before


def test_instruction_row_without_output(capsys, tmp_path):
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Say hi.", "output": "Hi."},
                                               {"instruction": "Say bye."}])
    code, message = run_cli(capsys, *sft(tmp_path, f"data.source={rows}"))
    expect(code, message, f"{rows}: row 2: field 'output' is missing",
           "expected a non-empty string", exit_code=1)


def test_data_file_with_a_broken_json_line(capsys, tmp_path):
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "Say bye", \n')
    code, message = run_cli(capsys, *sft(tmp_path, f"data.source={rows}"))
    expect(code, message, f"{rows}: row 2", "JSON", exit_code=1)


def test_missing_data_file_is_named(capsys, tmp_path):
    code, message = run_cli(capsys, *sft(tmp_path, f"data.source={tmp_path / 'gone.jsonl'}"))
    expect(code, message, f"{tmp_path / 'gone.jsonl'}: does not exist", exit_code=1)


# --------------------------------------------------------------------------- run folder, resume


def test_run_dir_that_cannot_be_created(capsys, tmp_path):
    """Root ignores file modes, so "not writable" is made honestly: the run_dir's parent is a
    regular file, which no user (root included) can create a folder in."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    code, message = run_cli(capsys, "sft", CONFIGS / "sft_tiny.yaml", f"run_dir={blocker / 'run'}",
                            *QUIET)
    expect(code, message, f"run_dir {blocker / 'run'}: cannot write there",
           f"{blocker} is a file, not a folder", "expected a folder this user can create and write",
           exit_code=1)
    assert blocker.read_text() == "keep me\n"


def finished_run(tmp_path: Path) -> tuple[Path, dict[Path, bytes]]:
    """A run folder as a finished sft run leaves it: config.yaml and checkpoint step 1 (driver
    state plus a placeholder for the learners' part). Returns the folder and its files' bytes."""
    cfg = build_config(RECIPES["sft"], CONFIGS / "sft_tiny.yaml", [f"run_dir={tmp_path / 'run'}", *QUIET])
    save_config(cfg, cfg.run_dir)
    step = checkpoint.step_dir(cfg.run_dir, 1)
    (step / "policy").mkdir(parents=True)
    (step / "policy" / "latest").write_text("state")
    files.write_json_atomic(step / checkpoint.STATE_FILE, checkpoint.JobState(step=1).__dict__)
    return Path(cfg.run_dir), snapshot(Path(cfg.run_dir))


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_a_changed_setting_names_the_key(capsys, tmp_path):
    run, before = finished_run(tmp_path)
    code, message = run_cli(capsys, *sft(tmp_path, "resume=auto", "optim.lr=0.5"))
    expect(code, message, "resume=auto: this config differs from the one that wrote",
           STEP1, "in optim.lr; only resume, max_steps", exit_code=2)
    assert snapshot(run) == before


def test_resume_never_on_a_folder_with_checkpoints(capsys, tmp_path):
    run, before = finished_run(tmp_path)
    code, message = run_cli(capsys, *sft(tmp_path))
    expect(code, message, f"run_dir {run} already holds checkpoints (newest: {STEP1})",
           "pass resume=auto", exit_code=2)
    assert snapshot(run) == before


def test_corrupt_checkpoint_state_is_named(capsys, tmp_path):
    run, _ = finished_run(tmp_path)
    state = checkpoint.step_dir(run, 1) / checkpoint.STATE_FILE
    state.write_text('{"step": 1, "epo')  # a disk error cut it short
    before = snapshot(run)
    code, message = run_cli(capsys, *sft(tmp_path, "resume=auto"))
    expect(code, message, f"checkpoint {state} cannot be read (JSONDecodeError",
           "expected the job state a finished save writes", exit_code=1)
    assert snapshot(run) == before


def test_checkpoint_without_the_learner_state(capsys, tmp_path):
    run, _ = finished_run(tmp_path)
    shutil.rmtree(checkpoint.step_dir(run, 1) / "policy")
    before = snapshot(run)
    code, message = run_cli(capsys, *sft(tmp_path, "resume=auto"))
    expect(code, message, f"checkpoint {checkpoint.step_dir(run, 1)} has state.json but no "
           "policy/ folder; expected the learners' weights and optimizer state there", exit_code=1)
    assert snapshot(run) == before


# --------------------------------------------------------------------------- cluster commands


@pytest.mark.parametrize("n", [0, -2])
def test_scale_to_fewer_than_one_worker(capsys, n):
    code, message = run_cli(capsys, "scale", "--address", "127.0.0.1:1", "--run", "x",
                            "--rollout", n)
    expect(code, message, f"scale --rollout {n}: expected at least 1 rollout worker", exit_code=2)


def test_scale_against_an_unreachable_cluster(capsys):
    code, message = run_cli(capsys, "scale", "--address", "127.0.0.1:1", "--run", "x",
                            "--rollout", "2")
    expect(code, message, "scale --address=127.0.0.1:1: no Ray head answers there",
           "expected 'local', 'auto', the GCS address of a running head", exit_code=1)


def test_submit_to_a_wrong_address(capsys):
    code, message = run_cli(capsys, "submit", "--address", "http://127.0.0.1:1", "generate",
                            CONFIGS / "generate_tiny.yaml")
    expect(code, message, "cannot reach the Ray dashboard at http://127.0.0.1:1",
           "is this its dashboard address (port 8265 by default)", exit_code=1)


def test_unreachable_ray_address_fails_fast(tmp_path):
    """``ray.init`` alone retries a dead address for minutes; the run must fail in seconds.
    A subprocess, because this test session's own Ray is already connected."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *map(str, sft(tmp_path)),
                          "ray.address=127.0.0.1:1"], capture_output=True, text=True, cwd=ROOT,
                         timeout=180)
    expect(out.returncode, out.stderr, "error: ray.address=127.0.0.1:1: no Ray head answers there",
           "the GCS address of a running head", exit_code=1)
    assert time.monotonic() - start < 120


# --------------------------------------------------------------------------- workers (local Ray)


def test_more_cpus_than_the_cluster_has_is_an_error_not_a_wait(capsys, ray_local, tmp_path):
    code, message = run_cli(capsys, *sft(tmp_path, "learner.cpus_per_worker=64",
                                         "ray.start_timeout_s=60"))
    total = ray_local.cluster_resources()["CPU"]
    expect(code, message, "learner: 1 worker(s) x 64 CPU (learner.cpus_per_worker)",
           f"the local Ray has {total:g} CPU in all", f"expected at most {total:g}", exit_code=1)


def test_gpus_on_a_cluster_without_any(capsys, ray_local, tmp_path):
    if ray_local.cluster_resources().get("GPU"):
        pytest.skip("this machine has GPUs")
    code, message = run_cli(capsys, *sft(tmp_path, "learner.gpus_per_worker=1",
                                         "ray.start_timeout_s=60"))
    expect(code, message, "learner: 1 worker(s) x 1 GPU (learner.gpus_per_worker)",
           "the local Ray has 0 GPU in all", exit_code=1)


def generate(tmp_path: Path, function: str) -> list[str]:
    return ["generate", CONFIGS / "generate_tiny.yaml", f"run_dir={tmp_path / 'run'}", *QUIET,
            "rollout.num_workers=1", "data.num_rows=4", "split=all", "sampling.max_new_tokens=4",
            f"reward.function={function}", "ray.start_timeout_s=300", "ray.call_timeout_s=300"]


def previous_episodes(tmp_path: Path) -> Path:
    """What an earlier generate run left in the run folder; a failed rerun must keep it."""
    (tmp_path / "run").mkdir()
    return write_jsonl(tmp_path / "run" / "episodes.jsonl", [{"prompt_text": "1 + 1", "score": 1.0}])


def test_reward_function_not_importable_in_the_worker(capsys, ray_local, tmp_path, monkeypatch):
    """The module imports on the driver (it is on the driver's sys.path only), not in the worker."""
    (tmp_path / "my_reward.py").write_text("def score(prompt, response, answer):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("my_reward")
    kept = previous_episodes(tmp_path)
    before = kept.read_bytes()
    code, message = run_cli(capsys, *generate(tmp_path, "my_reward:score"))
    expect(code, message, "reward worker rank 0", "reward.function 'my_reward:score': cannot "
           "import module 'my_reward'", "No module named 'my_reward'", exit_code=1)
    assert kept.read_bytes() == before


@pytest.mark.parametrize("function,needles", [
    ("reward_fns:always_raises", ["raised ValueError: this reward function is broken on purpose"]),
    ("reward_fns:returns_nan", ["returned nan (expected a finite float)"]),
    ("reward_fns:returns_text", ["returned 'great' (expected a float)"]),
    ("reward_fns:returns_numeric_text", ["returned '0.5' (expected a float)"]),
    ("reward_fns:returns_bool", ["returned True (expected a float)"]),
], ids=["raises", "nan", "string", "numeric-string", "bool"])
def test_reward_function_that_misbehaves_names_worker_function_and_episode(
        capsys, ray_local, tmp_path, function, needles):
    kept = previous_episodes(tmp_path)
    before = kept.read_bytes()
    code, message = run_cli(capsys, *generate(tmp_path, function))
    expect(code, message, "reward worker rank 0", f"reward function '{function}'",
           "on episode (prompt 0, sample 0", *needles, exit_code=1)
    assert kept.read_bytes() == before


# --------------------------------------------------------------------------- checkpoint saves


class _FullDisk:
    """A file whose every write fails as on a full disk (the disk is all that is simulated)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_during_a_checkpoint_save_keeps_the_previous_one(capsys, ray_local, tmp_path,
                                                                   monkeypatch):
    real_open = open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and STEP2 in str(file) else f

    monkeypatch.setattr(files, "open", open_on_a_full_disk, raising=False)
    run = tmp_path / "run"
    code, message = run_cli(capsys, *sft(tmp_path, "max_steps=2", "checkpoint.save_every=1"))
    monkeypatch.undo()
    expect(code, message, f"checkpoint {run / 'checkpoints' / STEP2}: the save failed "
           "(No space left on device)", f"the previous checkpoint {run / 'checkpoints' / STEP1} "
           "is intact; resume=auto continues from it", exit_code=1)
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == [STEP1]
    assert not checkpoint.step_dir(run, 2).exists()
    assert checkpoint.read_state(checkpoint.step_dir(run, 1)).step == 1
    # ... and a resume continues from it
    code = main([str(a) for a in sft(tmp_path, "max_steps=2", "checkpoint.save_every=1",
                                     "resume=auto")])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith(STEP1) and summary["start_step"] == 1
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == [STEP1, STEP2]


SLOW_STATE_SAVE = textwrap.dedent("""
    # rlhf-ray, with the save of step 2 held open at the moment it writes state.json (after the
    # learners wrote their part), so that a signal sent from outside lands inside the save.
    import sys, time
    from rlhf_ray import checkpoint
    from rlhf_ray.cli import main

    write = checkpoint.write_json_atomic

    def slow(path, data, **kwargs):
        if data.get("step") == 2:
            print("SAVING", flush=True)
            time.sleep(300)
        return write(path, data, **kwargs)

    checkpoint.write_json_atomic = slow
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_a_checkpoint_save_keeps_the_previous_one(tmp_path):
    import torch

    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_STATE_SAVE)
    run = tmp_path / "run"
    args = [*map(str, sft(tmp_path, "max_steps=2", "checkpoint.save_every=1")), "ray.num_cpus=1",
            "ray.object_store_mb=128", "ray.log_to_driver=false"]
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, line = time.monotonic() + 300, ""
        while time.monotonic() < deadline and line.strip() != "SAVING":
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.strip() == "SAVING", proc.stderr.read()[-3000:]
        assert checkpoint.partial_dir(run, 2).is_dir()  # the save is under way, under its temporary name
        assert not checkpoint.step_dir(run, 2).exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    expect(143, err, f"error: sft stopped by SIGTERM (exit 143); the newest complete checkpoint, "
           f"{run / 'checkpoints' / STEP1}, is kept: resume=auto continues from it")
    # the interrupted step 2 has no state.json, so it is never resumed; step 1 loads
    assert checkpoint.latest(run).name == STEP1
    assert not (checkpoint.step_dir(run, 2) / checkpoint.STATE_FILE).exists()
    assert checkpoint.read_state(checkpoint.step_dir(run, 1)).step == 1
    (states,) = (checkpoint.step_dir(run, 1) / "policy").glob("*/mp_rank_00_model_states.pt")
    assert torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2
