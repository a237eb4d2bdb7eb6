"""Answer checkers: correct answers in free text pass, wrong ones fail."""

from __future__ import annotations

import pytest

from rlhf_ray.data import CHECKERS, check_arithmetic, check_gsm8k, check_sorting, extract_number
from rlhf_ray.data.checkers import check_counting


@pytest.mark.parametrize("text", [
    "85", "The answer is 85.", "37 + 48 = 85", "Let me think. 37 + 48 is 85!", "Answer: 85",
    "#### 85", "The result is \\boxed{85}.", "The answer is 37 + 48 = 85", "It equals 85.0",
    "First 30 + 40 = 70, then 70 + 15 = 85. So the answer is 85.",
])
def test_arithmetic_accepts_correct_answers(text):
    assert check_arithmetic(text, "85") == 1.0


@pytest.mark.parametrize("text", [
    "84", "The answer is 86.", "37 + 48 = 84", "", "I don't know.", "The answer is 85 plus 1 = 86",
    "eighty five",
])
def test_arithmetic_rejects_wrong_answers(text):
    assert check_arithmetic(text, "85") == 0.0


def test_negative_decimal_and_thousands():
    assert check_arithmetic("The answer is -12.", "-12") == 1.0
    assert check_arithmetic("The answer is \u221212.", "-12") == 1.0
    assert check_arithmetic("The answer is 12.", "-12") == 0.0
    assert check_gsm8k("She makes $1,250 per week.\n#### 1,250", "1250") == 1.0
    assert check_gsm8k("So the total is 3.50 dollars.", "3.5") == 1.0
    assert check_gsm8k("The answer is 18 dollars, not 20.", "18") == 1.0
    assert check_counting("There are three.", "3") == 1.0
    assert extract_number("nothing here") is None


@pytest.mark.parametrize("text,expected", [
    ("1, 2, 5, 9", 1.0), ("The sorted list is 1, 2, 5, 9.", 1.0), ("Sorted: 1 2 5 9", 1.0),
    ("5, 2, 9, 1 sorted ascending: 1, 2, 5, 9", 1.0), ("[1, 2, 5, 9]", 1.0), ("1,2,5,9", 1.0),
    ("The sorted list is 1, 5, 2, 9.", 0.0), ("9, 5, 2, 1", 0.0), ("1, 2, 5", 0.0), ("", 0.0),
    ("The answer is 1, 2, 5, 10.", 0.0),
])
def test_sorting(text, expected):
    assert check_sorting(text, "1, 2, 5, 9") == expected


def test_registry_is_explicit():
    assert set(CHECKERS) == {"numeric", "arithmetic", "counting", "sorting", "gsm8k", "guess"}
    assert all(CHECKERS[name]("The answer is 7.", "7") == 1.0 for name in ("numeric", "arithmetic", "gsm8k"))
