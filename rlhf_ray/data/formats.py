"""Typed rows for the four data formats, and parsing of raw records (dicts) into them.

A *record* is what a source yields: a plain ``dict`` read from a file or produced by a
built-in generator. :func:`parse_row` turns one record into a typed row or raises
:class:`RowError` naming the offending field and what was expected. It never guesses: a
wrong type is an error, not a silent conversion (the one exception: a numeric ``answer``
is turned into its string form, because ground-truth answers are often stored as numbers).

Formats and their fields:

- ``instruction``: ``instruction`` (str), optional ``input`` (str), ``output`` (str).
- ``conversation``: ``messages``: a list of ``{"role", "content"}``; the last message is the
  assistant response that is trained on.
- ``prompt``: ``prompt`` (str, or a list of messages ending with a user message), optional
  ``answer`` (the ground truth for checkable rewards) and ``checker`` (a name in
  ``rlhf_ray.data.CHECKERS``). Other fields are kept in ``meta``.
- ``preference``: ``prompt``, ``chosen``, ``rejected``. Plain form: three strings.
  Conversational (TRL) form: ``prompt`` is a list of messages and ``chosen``/``rejected``
  are lists holding one assistant message each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from rlhf_ray.errors import UserError

Format = Literal["instruction", "conversation", "prompt", "preference"]
FORMATS: tuple[str, ...] = ("instruction", "conversation", "prompt", "preference")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")  # tool: a tool's result (context)

# The fields each format reads; used in messages and to pick the "prompt field" of a row.
FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "input", "output"),
    "conversation": ("messages",),
    "prompt": ("prompt", "answer", "checker"),
    "preference": ("prompt", "chosen", "rejected"),
}
PROMPT_FIELD: dict[str, str] = {
    "instruction": "instruction",
    "conversation": "messages",
    "prompt": "prompt",
    "preference": "prompt",
}

# Lone surrogates come from undecodable bytes (files are read with ``surrogateescape``).
_SURROGATE = re.compile("[\ud800-\udfff]")

NON_EMPTY = "a non-empty string"
MESSAGES = "a non-empty list of {role, content} messages"


class RowError(UserError, ValueError):
    """One record is invalid. ``field`` is the offending field (``None`` for the whole row)."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"field '{field}' {reason}" if field else reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Messages = tuple[Message, ...]


@dataclass(frozen=True)
class InstructionRow:
    """An Alpaca-style instruction row; ``input`` is ``""`` when the row has none."""

    instruction: str
    output: str
    input: str = ""
    row: int = field(default=0, compare=False)


@dataclass(frozen=True)
class ConversationRow:
    """A chat; the last message is the assistant response."""

    messages: Messages
    row: int = field(default=0, compare=False)

    @property
    def context(self) -> Messages:
        """All messages before the response."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1].content


@dataclass(frozen=True)
class PromptRow:
    """A prompt for generation, with an optional ground-truth ``answer`` and ``checker`` name."""

    prompt: str | Messages
    answer: str | None = None
    checker: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    row: int = field(default=0, compare=False)


@dataclass(frozen=True)
class PreferenceRow:
    """A preference pair. ``prompt`` is a string (plain form) or messages (conversational)."""

    prompt: str | Messages
    chosen: str
    rejected: str
    row: int = field(default=0, compare=False)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


Row = Union[InstructionRow, ConversationRow, PromptRow, PreferenceRow]


# --------------------------------------------------------------------------- field checks


def type_name(value: Any) -> str:
    """A short, JSON-flavoured type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _check_text(value: str, name: str) -> str:
    if _SURROGATE.search(value):
        raise RowError(name, "contains invalid UTF-8 bytes (expected valid UTF-8 text)")
    return value


def text_field(data: Mapping[str, Any], name: str, required: bool = True) -> str:
    """Read a string field: required fields must be present and non-empty."""
    value = data.get(name)
    if value is None:
        if required:
            raise RowError(name, f"is missing (expected {NON_EMPTY})")
        return ""
    if not isinstance(value, str):
        raise RowError(name, f"has type {type_name(value)} (expected {NON_EMPTY if required else 'a string'})")
    if required and not value.strip():
        raise RowError(name, f"is empty (expected {NON_EMPTY})")
    return _check_text(value, name)


def parse_messages(value: Any, name: str, last_role: str | None = None) -> Messages:
    """Parse a list of ``{role, content}`` dicts; ``name`` is the field for error messages."""
    if value is None:
        raise RowError(name, f"is missing (expected {MESSAGES})")
    if not isinstance(value, (list, tuple)):
        raise RowError(name, f"has type {type_name(value)} (expected {MESSAGES})")
    if not value:
        raise RowError(name, f"is empty (expected {MESSAGES})")
    out = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, Mapping):
            raise RowError(where, f"has type {type_name(item)} (expected a {{role, content}} object)")
        role = item.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"is {role!r} (expected one of {', '.join(ROLES)})")
        content = item.get("content")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"has type {type_name(content)} (expected a string)")
        if role != "system" and not content.strip():
            raise RowError(f"{where}.content", f"is empty (expected {NON_EMPTY})")
        out.append(Message(role, _check_text(content, f"{where}.content")))
    if last_role is not None and out[-1].role != last_role:
        raise RowError(f"{name}[{len(out) - 1}].role",
                       f"is '{out[-1].role}' (expected the last message to be '{last_role}')")
    return tuple(out)


def _prompt_field(data: Mapping[str, Any]) -> str | Messages:
    value = data.get("prompt")
    if isinstance(value, (list, tuple)):
        return parse_messages(value, "prompt", last_role="user")
    if value is not None and not isinstance(value, str):
        raise RowError("prompt", f"has type {type_name(value)} (expected {NON_EMPTY} or a list of messages)")
    return text_field(data, "prompt")


def _response_field(data: Mapping[str, Any], name: str, conversational: bool) -> str:
    """``chosen``/``rejected``: a string, or (conversational) a list of one assistant message."""
    value = data.get(name)
    if not conversational:
        if isinstance(value, (list, tuple)):
            raise RowError(name, "is a list of messages but 'prompt' is a string "
                                 "(expected a string, or a list of messages in 'prompt' too)")
        return text_field(data, name)
    expected = "a list with one assistant message, as 'prompt' is a list of messages"
    if value is None:
        raise RowError(name, f"is missing (expected {expected})")
    if not isinstance(value, (list, tuple)):
        raise RowError(name, f"has type {type_name(value)} (expected {expected})")
    if len(value) != 1:
        raise RowError(name, f"has {len(value)} messages (expected {expected})")
    (message,) = parse_messages(value, name, last_role="assistant")
    return message.content


def _answer_field(data: Mapping[str, Any]) -> str | None:
    value = data.get("answer")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError("answer", f"has type {type_name(value)} (expected a string or a number)")
    return _check_text(str(value), "answer")


def _checker_field(data: Mapping[str, Any]) -> str | None:
    from rlhf_ray.data.checkers import CHECKERS

    value = data.get("checker")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RowError("checker", f"has type {type_name(value)} (expected a checker name)")
    if value not in CHECKERS:
        raise RowError("checker", f"is {value!r}, an unknown checker (expected one of {', '.join(CHECKERS)})")
    return value


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


# --------------------------------------------------------------------------- parsing


def parse_row(data: Any, format: str, row: int = 0) -> Row:
    """Parse one record into the typed row of ``format``; raises :class:`RowError`."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r} (expected one of {', '.join(FORMATS)})")
    if not isinstance(data, Mapping):
        raise RowError(None, f"is a {type_name(data)} (expected an object with fields "
                             f"{', '.join(FIELDS[format])})")
    if format == "instruction":
        return InstructionRow(instruction=text_field(data, "instruction"),
                              output=text_field(data, "output"),
                              input=text_field(data, "input", required=False), row=row)
    if format == "conversation":
        messages = parse_messages(data.get("messages"), "messages", last_role="assistant")
        if not any(m.role == "user" for m in messages):
            raise RowError("messages", "has no user message (expected at least one)")
        return ConversationRow(messages=messages, row=row)
    if format == "prompt":
        prompt = _prompt_field(data)
        extra = {k: _json_safe(v) for k, v in data.items() if k not in FIELDS["prompt"]}
        return PromptRow(prompt=prompt, answer=_answer_field(data), checker=_checker_field(data),
                         meta=extra, row=row)
    prompt = _prompt_field(data)
    conversational = not isinstance(prompt, str)
    chosen = _response_field(data, "chosen", conversational)
    rejected = _response_field(data, "rejected", conversational)
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "is identical to 'chosen' (expected two different responses)")
    return PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, row=row)


def row_to_dict(row: Row) -> dict[str, Any]:
    """The inverse of :func:`parse_row` (for writing rows back to JSONL)."""

    def msgs(m: Messages) -> list[dict[str, str]]:
        return [x.to_dict() for x in m]

    if isinstance(row, InstructionRow):
        out: dict[str, Any] = {"instruction": row.instruction, "input": row.input, "output": row.output}
        return out
    if isinstance(row, ConversationRow):
        return {"messages": msgs(row.messages)}
    if isinstance(row, PromptRow):
        out = {"prompt": row.prompt if isinstance(row.prompt, str) else msgs(row.prompt)}
        if row.answer is not None:
            out["answer"] = row.answer
        if row.checker is not None:
            out["checker"] = row.checker
        return {**dict(row.meta), **out}
    if isinstance(row.prompt, str):
        return {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected}
    return {"prompt": msgs(row.prompt),
            "chosen": [{"role": "assistant", "content": row.chosen}],
            "rejected": [{"role": "assistant", "content": row.rejected}]}


def row_key(row: Row) -> str:
    """A canonical string of the row's content (row number and meta excluded); for de-duplication."""
    data = row_to_dict(row)
    if isinstance(row, PromptRow):
        data = {k: data[k] for k in FIELDS["prompt"] if k in data}
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def format_of(row: Row) -> str:
    """The format name of a typed row."""
    return {InstructionRow: "instruction", ConversationRow: "conversation",
            PromptRow: "prompt", PreferenceRow: "preference"}[type(row)]
