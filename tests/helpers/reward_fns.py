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


def returns_numeric_text(prompt: str, response: str, answer) -> float:
    return "0.5"  # type: ignore[return-value]  # a number as text is still not a number


def returns_bool(prompt: str, response: str, answer) -> float:
    return True  # type: ignore[return-value]  # a verdict, not a score
