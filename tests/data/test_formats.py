"""Row parsing and prompt rendering: the Alpaca template character for character, chat templates."""

from __future__ import annotations

import pytest

from rlhf_ray.data import (
    ALPACA_PROMPT,
    ConversationRow,
    InstructionRow,
    Message,
    PreferenceRow,
    PromptRow,
    RowError,
    alpaca_prompt,
    parse_row,
    prompt_text,
    render_preference,
    render_sft,
    row_to_dict,
)

# MISSION.md, verbatim (the second sentence is on its own line there).
MISSION_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context.\n"
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Translate the text.\n"
    "\n"
    "### Input:\n"
    "Bonjour le monde\n"
    "\n"
    "### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hello.\n\n### Response:\n"
)


def test_alpaca_with_input_is_exact():
    assert alpaca_prompt("Translate the text.", "Bonjour le monde") == MISSION_WITH_INPUT
    assert ALPACA_PROMPT.format(instruction="Translate the text.", input="Bonjour le monde") == MISSION_WITH_INPUT


@pytest.mark.parametrize("data", [
    {"instruction": "Say hello.", "output": "Hello."},
    {"instruction": "Say hello.", "input": "", "output": "Hello."},
    {"instruction": "Say hello.", "input": None, "output": "Hello."},
    {"instruction": "Say hello.", "input": "  ", "output": "Hello."},
])
def test_alpaca_without_input_uses_short_variant(data):
    row = parse_row(data, "instruction")
    assert render_sft(row, "alpaca") == (NO_INPUT, "Hello.")


def test_instruction_with_chat_template(tok):
    row = InstructionRow("Translate the text.", "Hello world", input="Bonjour le monde")
    prompt, response = render_sft(row, "chat", tok)
    assert prompt.endswith("<|im_start|>user\nTranslate the text.\n\nBonjour le monde<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert response == "Hello world"
    no_input = prompt_text(InstructionRow("Say hello.", "Hello."), "chat", tok)
    assert no_input.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")


def test_conversation_chat_rendering(tok):
    row = parse_row({"messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"}]}, "conversation")
    assert isinstance(row, ConversationRow)
    prompt, response = render_sft(row, "chat", tok)
    assert response == "6"
    assert prompt == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    # The full conversation rendered by the template is exactly prompt + response + EOS + "\n".
    full = tok.apply_chat_template([m.to_dict() for m in row.messages], tokenize=False)
    assert full == prompt + response + "<|im_end|>\n"


def test_conversation_with_alpaca_needs_single_turn():
    single = parse_row({"messages": [{"role": "user", "content": "Say hello."},
                                     {"role": "assistant", "content": "Hello."}]}, "conversation")
    assert render_sft(single, "alpaca") == (NO_INPUT, "Hello.")
    multi = parse_row({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
                      "conversation")
    with pytest.raises(RowError, match="template 'chat'"):
        render_sft(multi, "alpaca")


def test_prompt_rows():
    row = parse_row({"prompt": "What is 37 + 48?", "answer": 85, "checker": "arithmetic", "id": 7}, "prompt")
    assert row == PromptRow("What is 37 + 48?", answer="85", checker="arithmetic")
    assert row.meta == {"id": 7}
    assert prompt_text(row, "alpaca").startswith("Below is an instruction that describes a task. Write")
    conv = parse_row({"prompt": [{"role": "user", "content": "Hi"}]}, "prompt")
    assert conv.prompt == (Message("user", "Hi"),) and conv.answer is None


def test_preference_plain_and_conversational(tok):
    plain = parse_row({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "preference")
    assert isinstance(plain, PreferenceRow) and not plain.conversational
    conv = parse_row({"prompt": [{"role": "user", "content": "Hi"}],
                      "chosen": [{"role": "assistant", "content": "Hello!"}],
                      "rejected": [{"role": "assistant", "content": "Go away."}]}, "preference")
    assert conv.conversational and conv.chosen == "Hello!" and conv.rejected == "Go away."
    assert render_preference(plain, "chat", tok) == render_preference(conv, "chat", tok)
    assert render_preference(plain, "alpaca") == render_preference(conv, "alpaca")
    assert parse_row(row_to_dict(conv), "preference") == conv
    assert parse_row(row_to_dict(plain), "preference") == plain


def test_parse_errors_name_the_field():
    with pytest.raises(RowError) as err:
        parse_row({"prompt": "Hi", "rejected": "x"}, "preference")
    assert err.value.field == "chosen" and "is missing" in str(err.value)
    with pytest.raises(RowError) as err:
        parse_row({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}, "conversation")
    assert err.value.field == "messages[1].role"
    with pytest.raises(RowError) as err:
        parse_row(["not", "a", "dict"], "instruction")
    assert err.value.field is None and "expected an object" in str(err.value)
    with pytest.raises(ValueError, match="unknown data format"):
        parse_row({}, "nonsense")
