"""Prompt rendering: the Alpaca template (as written in MISSION.md) and the tokenizer's chat template.

Every row splits into a *prompt* text (what the model is conditioned on) and a *response*
text (what it learns to produce). The response is appended right after the prompt; the EOS
token is appended as a token id at tokenisation time (see :mod:`rlhf_ray.data.tokenize`).

Alpaca: both variants end with ``"### Response:\\n"``, so the response starts on the line
after the header. The with-input variant follows MISSION.md character for character
(including its line break before "Write a response ..."); the no-input variant is the
usual shorter Alpaca text.

Chat: the messages before the response are rendered with
``tokenizer.apply_chat_template(..., add_generation_prompt=True)``. Instruction rows become
one user message (``instruction``, plus ``"\\n\\n" + input`` when there is an input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rlhf_ray.data.formats import (
    ConversationRow,
    InstructionRow,
    Message,
    Messages,
    PreferenceRow,
    PromptRow,
    Row,
    RowError,
)

Template = Literal["alpaca", "chat"]
TEMPLATES: tuple[str, ...] = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context.\n"
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "### Input:\n"
    "{input}\n"
    "\n"
    "### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; rows with a missing or blank input use the no-input variant."""
    if input and input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def instruction_message(instruction: str, input: str = "") -> Message:
    """The user message for an instruction row under the chat template."""
    text = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    return Message("user", text)


def chat_prompt(messages: Sequence[Message], tokenizer: Any) -> str:
    """Render ``messages`` with the tokenizer's chat template, ending with the assistant header."""
    if tokenizer is None:
        raise ValueError("template 'chat' needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "?"
        raise ValueError(f"data.template=chat, but the tokenizer in {name} has no chat template "
                         "(expected 'chat_template' in its tokenizer_config.json or a "
                         "chat_template.jinja); use data.template=alpaca")
    return tokenizer.apply_chat_template([m.to_dict() for m in messages], tokenize=False,
                                         add_generation_prompt=True)


def _alpaca_from_messages(messages: Messages, field: str) -> str:
    """A single user message can be rendered with Alpaca; anything longer needs 'chat'."""
    if len(messages) != 1 or messages[0].role != "user":
        raise RowError(field, "has several messages; template 'alpaca' takes one user message "
                              "(expected template 'chat' for multi-message prompts)")
    return alpaca_prompt(messages[0].content)


def prompt_messages(row: Row) -> Messages:
    """The messages before the response, for the chat template."""
    if isinstance(row, InstructionRow):
        return (instruction_message(row.instruction, row.input),)
    if isinstance(row, ConversationRow):
        return row.context
    prompt = row.prompt
    return (Message("user", prompt),) if isinstance(prompt, str) else prompt


def prompt_text(row: Row, template: str, tokenizer: Any = None) -> str:
    """The text the model is conditioned on (everything before the response)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")
    if template == "chat":
        return chat_prompt(prompt_messages(row), tokenizer)
    if isinstance(row, InstructionRow):
        return alpaca_prompt(row.instruction, row.input)
    if isinstance(row, ConversationRow):
        context = row.context
        if context and context[0].role == "system":
            raise RowError("messages", "starts with a system message; template 'alpaca' has no "
                                       "system part (expected template 'chat')")
        return _alpaca_from_messages(context, "messages")
    if isinstance(row.prompt, str):
        return alpaca_prompt(row.prompt)
    return _alpaca_from_messages(row.prompt, "prompt")


def response_text(row: Row) -> str:
    """The reference response of an SFT row (instruction or conversation)."""
    if isinstance(row, InstructionRow):
        return row.output
    if isinstance(row, ConversationRow):
        return row.response
    if isinstance(row, PromptRow):
        raise TypeError("prompt rows have no response; use prompt_text")
    raise TypeError("preference rows have two responses: use row.chosen and row.rejected")


def render_sft(row: InstructionRow | ConversationRow, template: str, tokenizer: Any = None) -> tuple[str, str]:
    """``(prompt, response)`` texts of an SFT row; the model is trained on the response only."""
    return prompt_text(row, template, tokenizer), response_text(row)


def render_preference(row: PreferenceRow, template: str, tokenizer: Any = None) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` texts of a preference row."""
    return prompt_text(row, template, tokenizer), row.chosen, row.rejected
