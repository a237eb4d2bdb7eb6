"""Prompts for the online recipes (ppo, rs, prefs, generate, the pipeline's evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config import DataConfig
from rlhf_ray.data import DataError, load_rows, tokenize_prompts
from rlhf_ray.data.formats import PROMPT_FIELD, format_of
from rlhf_ray.data.templates import prompt_messages


@dataclass
class Prompt:
    """A tokenised prompt with its global index (for grouping) and ground truth."""

    prompt_ids: list[int]
    answer: str | None
    index: int
    text: str = ""  # the rendered prompt (template applied)
    raw: object = ""  # the row's prompt before the template (a string or messages)

    @property
    def plain(self) -> str:
        """The prompt as text, before the template: the string, or a chat's last user message
        (what an environment's ``reset`` receives)."""
        if isinstance(self.raw, str):
            return self.raw
        users = [m.get("content", "") for m in self.raw or [] if m.get("role") == "user"]
        return users[-1] if users else self.text


def load_prompts(data: DataConfig, tokenizer, max_model_len: int, split: str) -> list[Prompt]:
    """The validated, tokenised prompts of ``split``; an empty result is an error that says why."""
    rows = load_rows(data, split, tokenizer).rows
    if not rows:
        raise DataError(data.source, f"the {split} split is empty (data.num_rows={data.num_rows}, "
                                     f"data.heldout_fraction={data.heldout_fraction})")
    by_row = {r.row: r for r in rows}
    examples, stats = tokenize_prompts(rows, tokenizer, max_model_len - 1, data.truncation, data.template)
    if stats.dropped and not data.skip_invalid:
        _too_long(data, rows, {e.row for e in examples}, tokenizer, max_model_len)
    if not examples:
        raise DataError(data.source, f"no {split} prompts fit rollout.max_model_len={max_model_len}")
    return [Prompt(e.prompt_ids, e.answer, i, e.text, raw_prompt(by_row[e.row]))
            for i, e in enumerate(examples)]


def _too_long(data: DataConfig, rows: list, kept: set[int], tokenizer, max_model_len: int) -> None:
    """A prompt that leaves vLLM no room to answer is an error, like one over data.max_length."""
    row = next(r for r in rows if r.row not in kept)
    (example,), _ = tokenize_prompts([row], tokenizer, 1 << 30, "drop", data.template)
    raise DataError(data.source, f"is too long: the prompt has {len(example.prompt_ids)} tokens with "
                                 f"template '{data.template}' (expected fewer than "
                                 f"rollout.max_model_len - 1 = {max_model_len - 1}); raise "
                                 "rollout.max_model_len, or set data.truncation=truncate or "
                                 "data.skip_invalid=true", row=row.row, field=PROMPT_FIELD[format_of(row)])


def raw_prompt(row) -> object:
    """The user-facing prompt of a row (what ``rm`` / ``dpo`` re-render with their template)."""
    if hasattr(row, "prompt"):
        prompt = row.prompt
        return prompt if isinstance(prompt, str) else [m.to_dict() for m in prompt]
    messages = prompt_messages(row)
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return [m.to_dict() for m in messages]


def prompts_for_step(prompts: list[Prompt], step: int, per_step: int) -> list[Prompt]:
    """The prompts of step ``step``: a deterministic walk through the set (resumable)."""
    start = step * per_step
    return [prompts[(start + i) % len(prompts)] for i in range(per_step)]
