"""Exact answer checkers for checkable tasks: ``check(response_text, answer) -> 1.0 | 0.0``.

The reward server looks checkers up by name in :data:`CHECKERS` (an explicit dict). Each
checker extracts the *final* answer from free text:

1. an explicit marker wins, the last one in the text: ``#### 18``, ``\\boxed{18}``,
   ``answer is 18``, ``answer: 18``, ``result is 18``, ``= 18`` (for numbers);
2. otherwise the last number in the text (``"37 + 48 = 85"`` -> 85).

Numbers may carry thousands separators, a sign (ASCII or Unicode minus), a currency sign,
a decimal part (``85.0`` equals ``85``) or be spelled as a word up to twenty (larger spelled-out numbers are not parsed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

Checker = Callable[[str, str], float]

_SIGN = r"(?:[-+\u2212]\$?|\$[-+\u2212]?)?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_SIGN}(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(rf"(?<![\w.]){_SIGN}\d+(?:\.\d+)?")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
          "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_BIG_WORDS = "thirty forty fifty sixty seventy eighty ninety hundred thousand million".split()
_WORD_RE = re.compile(r"\b(" + "|".join(_WORDS + _BIG_WORDS) + r")\b", re.IGNORECASE)
_MARKERS = re.compile(
    r"####|\\boxed\{|\banswer\s*(?:is|:|=)|\bresult\s*(?:is|:|=)|\bequals\b|\bsorted\b[^:\d]*:?",
    re.IGNORECASE,
)


def parse_number(text: str) -> float | None:
    """Parse one number token such as ``"-1,234.50"`` or ``"$18"``; ``None`` if it is not one."""
    cleaned = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    try:
        value = float(cleaned)
    except ValueError:
        if cleaned.lower() in _WORDS:
            return float(_WORDS.index(cleaned.lower()))
        return None
    return value if math.isfinite(value) else None


def find_numbers(text: str, thousands: bool = True) -> list[float]:
    """All numbers in ``text``, in order (spelled-out numbers only if there are no digits).

    With ``thousands=False`` a comma always separates numbers (``"1,234"`` is 1 and 234).
    """
    pattern = _NUMBER_RE if thousands else _PLAIN_NUMBER_RE
    values = [parse_number(m.group()) for m in pattern.finditer(text)]
    found = [v for v in values if v is not None]
    if not found:
        words = [m.group().lower() for m in _WORD_RE.finditer(text)]
        if any(w in _BIG_WORDS for w in words):
            return []  # "eighty five" is not parsed (rather than misread as 5)
        found = [float(_WORDS.index(w)) for w in words]
    return found


def _after_last_marker(text: str) -> str | None:
    matches = list(_MARKERS.finditer(text))
    return text[matches[-1].end():] if matches else None


def extract_number(text: str) -> float | None:
    """The final numeric answer in free text (see the module docstring for the rules)."""
    if not isinstance(text, str):
        return None
    tail = _after_last_marker(text)
    if tail is not None:
        value = _after_last_equals(tail)
        if value is not None:
            return value
        numbers = find_numbers(tail)
        if numbers:
            return numbers[0]
    value = _after_last_equals(text)
    if value is not None:
        return value
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def _after_last_equals(text: str) -> float | None:
    """The first number after the last ``=`` ("37 + 48 = 85" -> 85), if any."""
    equals = text.rfind("=")
    numbers = find_numbers(text[equals + 1:]) if equals >= 0 else []
    return numbers[0] if numbers else None


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def check_numeric(response_text: str, answer: str) -> float:
    """1.0 if the final number in the response equals the numeric ``answer``."""
    return 1.0 if _same(extract_number(response_text), parse_number(str(answer))) else 0.0


def check_arithmetic(response_text: str, answer: str) -> float:
    """Checker for the ``arithmetic`` built-in ("What is 37 + 48?" -> "85")."""
    return check_numeric(response_text, answer)


def check_counting(response_text: str, answer: str) -> float:
    """Checker for the ``counting`` built-in (how many times a letter occurs)."""
    return check_numeric(response_text, answer)


def check_gsm8k(response_text: str, answer: str) -> float:
    """Checker for GSM8K: the final number (``#### 18``, "The answer is 18", or the last number)."""
    return check_numeric(response_text, answer)


def extract_list(text: str, length: int) -> list[float] | None:
    """The final list of ``length`` numbers in free text: the numbers right after the last
    marker (``answer is``, ``sorted ...:``) if there is one, else the last ``length`` numbers."""
    if not isinstance(text, str) or length <= 0:
        return None
    tail = _after_last_marker(text)
    if tail is not None:
        numbers = find_numbers(tail, thousands=False)
        if len(numbers) >= length:
            return numbers[:length]
    numbers = find_numbers(text, thousands=False)
    return numbers[-length:] if len(numbers) >= length else None


def check_sorting(response_text: str, answer: str) -> float:
    """Checker for the ``sorting`` built-in: ``answer`` is ``"1, 2, 5, 9"``."""
    expected = [parse_number(x) for x in str(answer).split(",")]
    if not expected or any(x is None for x in expected):
        return 0.0
    got = extract_list(response_text, len(expected))
    if got is None:
        return 0.0
    return 1.0 if all(_same(a, b) for a, b in zip(got, expected)) else 0.0


CHECKERS: dict[str, Checker] = {
    "numeric": check_numeric,
    "arithmetic": check_arithmetic,
    "counting": check_counting,
    "sorting": check_sorting,
    "gsm8k": check_gsm8k,
    "guess": check_arithmetic,  # one guess, scored as a final number (env.name=guess plays it over turns)
}
"""Checker name -> function; the reward server uses ``CHECKERS[name](response, answer)``."""
