"""Tokenisation: response-only loss masks (with EOS), truncation counts, packing, collation."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import DataConfig
from rlhf_ray.data import (
    IGNORE_INDEX,
    ConversationRow,
    DataError,
    InstructionRow,
    Message,
    PreferenceRow,
    PromptRow,
    block_causal_mask,
    collate_packed,
    collate_preference,
    collate_prompts,
    collate_sft,
    load_rows,
    pack_sft,
    pad_id,
    render_sft,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)

EOS = "<|im_end|>"
ROWS = [
    InstructionRow("Give the opposite of the word.", "cold", input="hot", row=1),
    InstructionRow("Say hello in French.", "Bonjour, comment allez-vous ?", row=2),
    ConversationRow((Message("user", "2+2?"), Message("assistant", "4")), row=3),
    ConversationRow((Message("system", "Be terse."), Message("user", "2+2?"), Message("assistant", "4"),
                     Message("user", "3+3?"), Message("assistant", "The answer is 6.")), row=4),
]


def _masked_text(tok, example) -> str:
    return tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_mask_covers_exactly_response_and_eos(tok, template):
    rows = ROWS if template == "chat" else ROWS[:3]
    examples, stats = tokenize_sft(rows, tok, 512, "drop", template)
    assert (stats.kept, stats.dropped, stats.truncated) == (len(rows), 0, 0)
    for row, ex in zip(rows, examples):
        prompt, response = render_sft(row, template, tok)
        assert _masked_text(tok, ex) == response + EOS
        assert tok.decode(ex.input_ids[: ex.prompt_length]) == prompt
        assert tok.decode(ex.input_ids) == prompt + response + EOS
        # the mask is one contiguous block at the end, ending on the EOS id
        assert ex.loss_mask == [0] * ex.prompt_length + [1] * (len(ex) - ex.prompt_length)
        assert ex.input_ids[-1] == tok.eos_token_id
        assert ex.labels == [IGNORE_INDEX] * ex.prompt_length + ex.input_ids[ex.prompt_length:]


def test_truncation_policy_counts(tok):
    long = InstructionRow("Repeat the list.", " ".join(["apple"] * 100), row=9)
    rows = [ROWS[0], long, ROWS[1]]
    limit = 60
    kept, stats = tokenize_sft(rows, tok, limit, "drop")
    assert (stats.kept, stats.dropped, stats.truncated) == (2, 1, 0)
    assert [e.row for e in kept] == [1, 2]
    cut, stats = tokenize_sft(rows, tok, limit, "truncate")
    assert (stats.kept, stats.dropped, stats.truncated) == (3, 0, 1)
    assert len(cut[1]) == limit and cut[1].loss_mask[-1] == 1
    assert _masked_text(tok, cut[1]).startswith("apple apple")
    # a prompt that leaves no room for the response is dropped under both policies
    for policy in ("drop", "truncate"):
        _, stats = tokenize_sft(rows, tok, 20, policy)
        assert stats.dropped == 3 and stats.kept == 0
    with pytest.raises(ValueError, match="truncation"):
        tokenize_sft(rows, tok, 60, "cut")


def test_collate_sft_right_pads(tok):
    examples, _ = tokenize_sft(ROWS[:3], tok, 512)
    batch = collate_sft(examples, pad_id(tok))
    lengths = [len(e) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, e in enumerate(examples):
        n = len(e)
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["loss_mask"][i, n:] == 0).all()
        assert batch["labels"][i, :n].tolist() == e.labels
    assert all(v.dtype == torch.long for v in batch.values())
    assert collate_sft(examples, 2, pad_to_multiple_of=64)["input_ids"].shape[1] == 64 * -(-max(lengths) // 64)


def test_packing_keeps_response_only_masks(tok):
    data = load_rows(DataConfig(source="arithmetic", format="instruction", num_rows=40), split="all")
    examples, _ = tokenize_sft(data.rows, tok, 128)
    packs = pack_sft(examples, 128)
    assert len(packs) < len(examples)
    assert all(len(p) <= 128 for p in packs)
    assert sum(len(p.rows) for p in packs) == len(examples)
    it = iter(examples)
    for pack in packs:
        start = 0
        for doc in range(1, len(pack.rows) + 1):
            ex = next(it)
            end = start + len(ex)
            assert pack.input_ids[start:end] == ex.input_ids
            assert pack.loss_mask[start:end] == ex.loss_mask
            assert pack.position_ids[start:end] == list(range(len(ex)))
            assert pack.document_ids[start:end] == [doc] * len(ex)
            assert pack.loss_mask[start] == 0  # no target crosses into the next example
            start = end
        masked = [t for t, m in zip(pack.input_ids, pack.loss_mask) if m]
        assert tok.decode(masked).count(EOS) == len(pack.rows)
    batch = collate_packed(packs, pad_id(tok))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_mask", "position_ids", "document_ids"}
    assert int(batch["loss_mask"].sum()) == sum(sum(e.loss_mask) for e in examples)
    mask = block_causal_mask(batch["document_ids"])
    assert mask.shape == (len(packs), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    docs = batch["document_ids"][0]
    first_doc_end = int((docs == 1).sum())
    assert not mask[0, 0, first_doc_end, first_doc_end - 1]  # second example can't see the first
    assert mask[0, 0, first_doc_end + 1, first_doc_end]
    with pytest.raises(ValueError, match="do not fit"):
        pack_sft(examples, 8)


def test_preference_tokenisation(tok):
    rows = [PreferenceRow("What is 2 + 3?", "The answer is 5.", "The answer is 6.", row=1),
            PreferenceRow((Message("user", "Hi"),), "Hello there, friend!", "No.", row=2)]
    examples, stats = tokenize_preference(rows, tok, 256, template="chat")
    assert stats.kept == 2
    for row, ex in zip(rows, examples):
        assert tok.decode(ex.chosen_ids) == row.chosen + EOS
        assert tok.decode(ex.rejected_ids) == row.rejected + EOS
    batch = collate_preference(examples, pad_id(tok))
    for side, attr in (("chosen", "chosen_ids"), ("rejected", "rejected_ids")):
        for i, ex in enumerate(examples):
            masked = batch[f"{side}_input_ids"][i][batch[f"{side}_loss_mask"][i] == 1].tolist()
            assert masked == getattr(ex, attr)
            assert int(batch[f"{side}_attention_mask"][i].sum()) == len(ex.prompt_ids) + len(getattr(ex, attr))
    assert batch["prompt_lengths"].tolist() == [len(e.prompt_ids) for e in examples]
    # truncation: both responses cut to the room left; identical after the cut -> dropped
    fits = PreferenceRow("Q?", "Yes.", "No.")
    differs = PreferenceRow("Q?", "Yes, because " + "it is so " * 10, "No.")
    same_start = PreferenceRow("Q?", "The answer is five, and here is why: " * 5,
                               "The answer is five, and here is why: " * 4 + "no.")
    prompt_len = len(tokenize_prompts([fits], tok, 512)[0][0].prompt_ids)
    kept, stats = tokenize_preference([fits, differs, same_start], tok, prompt_len + 10, "truncate")
    assert (stats.kept, stats.dropped, stats.truncated) == (2, 1, 1)
    assert len(kept[1].chosen_ids) == 10 and kept[1].rejected_ids == kept[0].rejected_ids
    _, stats = tokenize_preference([fits, differs, same_start], tok, prompt_len + 10, "drop")
    assert (stats.kept, stats.dropped, stats.truncated) == (1, 2, 0)


def test_prompt_tokenisation_for_generation(tok):
    rows = [PromptRow("What is 37 + 48?", answer="85", checker="arithmetic", row=1),
            PromptRow("Write a haiku about the sea and the wind and the long grey rain.", row=2)]
    examples, stats = tokenize_prompts(rows, tok, 512, template="chat")
    assert stats.kept == 2 and examples[0].answer == "85" and examples[0].checker == "arithmetic"
    assert tok.decode(examples[0].prompt_ids).endswith("<|im_start|>assistant\n")
    batch = collate_prompts(examples, pad_id(tok))
    n0, n1 = len(examples[0].prompt_ids), len(examples[1].prompt_ids)
    width = max(n0, n1)
    assert batch["input_ids"][0, width - n0:].tolist() == examples[0].prompt_ids  # left padding
    assert batch["attention_mask"][0].tolist() == [0] * (width - n0) + [1] * n0
    right = collate_prompts(examples, pad_id(tok), padding_side="right")
    assert right["input_ids"][0, :n0].tolist() == examples[0].prompt_ids
    short = min(n0, n1) + 1
    _, stats = tokenize_prompts(rows, tok, short, "drop", "chat")
    assert (stats.kept, stats.dropped) == (1, 1)
    cut, stats = tokenize_prompts(rows, tok, short, "truncate", "chat")
    assert stats.truncated == 1 and len(cut[1].prompt_ids) == short - 1
    assert cut[1].prompt_ids == examples[1].prompt_ids[-(short - 1):]


def test_one_call_helpers_follow_the_config(tok):
    from rlhf_ray.data import (
        PackedExample,
        SFTExample,
        preference_examples,
        prompt_examples,
        sft_examples,
    )

    cfg = DataConfig(source="arithmetic", format="instruction", num_rows=60, max_length=128)
    examples, stats, data = sft_examples(cfg, tok, "train")
    assert all(isinstance(e, SFTExample) for e in examples) and stats.kept == len(data.rows) == len(examples)
    cfg.packing = True
    packs, _, _ = sft_examples(cfg, tok, "train")
    assert all(isinstance(p, PackedExample) for p in packs) and sum(len(p.rows) for p in packs) == len(examples)
    pairs, stats, _ = preference_examples(DataConfig(source="sorting", format="preference", num_rows=20), tok)
    assert stats.kept == len(pairs) > 0
    prompts, _, data = prompt_examples(DataConfig(source="counting", format="prompt", num_rows=20), tok, "heldout")
    assert len(prompts) == len(data.rows) and all(p.checker == "counting" for p in prompts)
    with pytest.raises(DataError, match="expected 'preference'"):
        preference_examples(DataConfig(source="sorting", format="prompt"), tok)
