"""User-style reward functions for tests, importable by Ray workers (tests/helpers is on
PYTHONPATH in the test Ray session)."""

import math


def response_length(prompt: str, response: str, answer) -> float:
    return float(len(response))


def always_raises(prompt: str, response: str, answer) -> float:
    raise ValueError("this reward function is broken on purpose")


def returns_nan(prompt: str, response: str, answer) -> float:
    return math.nan


def returns_text(prompt: str, response: str, answer) -> float:
    return "great"  # type: ignore[return-value]  # a verdict where a number belongs
