"""Packed SFT rows compute each example exactly as it would be computed alone.

A pack runs with its ``position_ids`` and the additive 4-D :func:`block_causal_mask` of its
``document_ids`` (what the learner's forward passes for a batch that carries them). With a
plain causal mask instead, the tiny Llama's per-token log-probs move by ~0.26 and the summed
response loss by ~8e-5 relative (both asserted below); a boolean 4-D mask under eager
attention is just as wrong (transformers adds a 4-D mask to the scores as given).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch, SequenceBatch
from rlhf_ray.config import DataConfig
from rlhf_ray.data import (
    block_causal_mask,
    load_rows,
    load_tokenizer,
    pack_sft,
    pad_id,
    tokenize_sft,
)
from rlhf_ray.driver.batches import sequence_batch
from rlhf_ray.losses import token_logprobs


@pytest.fixture(scope="module")
def data():
    """12 arithmetic SFT examples (~48 tokens) and their 3 packs of 4 (one pack padded)."""
    from rlhf_ray.assets import TINY_LLAMA, ensure

    path = ensure(TINY_LLAMA)
    tok = load_tokenizer(path)
    rows = load_rows(DataConfig(source="arithmetic", format="instruction", num_rows=12),
                     split="all").rows
    examples, _ = tokenize_sft(rows, tok, 128)
    packs = pack_sft(examples, 200)
    assert [len(p.rows) for p in packs] == [4, 4, 4]
    assert len({len(p) for p in packs}) > 1, "a pack must end in padding"
    return path, examples, packs, pad_id(tok)


def logprobs(model, batch: SequenceBatch, packed: bool = True) -> torch.Tensor:
    """(B, T-1) log-probs; a packed batch runs as the learner runs it (unless ``packed=False``:
    the defect, a plain causal mask over the whole row)."""
    kwargs = {"attention_mask": batch.attention_mask}
    if packed and batch.document_ids is not None:
        kwargs = {"attention_mask": block_causal_mask(batch.document_ids, torch.float32),
                  "position_ids": batch.position_ids}
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, use_cache=False, **kwargs).logits
    assert torch.isfinite(logits).all()  # padding rows included
    return token_logprobs(logits, batch.input_ids)


def per_example(packed: torch.Tensor, packs, examples) -> list[tuple[torch.Tensor, int]]:
    """Each example's slice of the packed log-probs (its n-1 next-token entries), in order."""
    out, i = [], 0
    for p, pack in enumerate(packs):
        start = 0
        for _ in pack.rows:
            n = len(examples[i].input_ids)
            out.append((packed[p, start: start + n - 1], n))
            start, i = start + n, i + 1
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_logprobs_equal_unpacked(data, attn):
    from transformers import AutoModelForCausalLM

    path, examples, packs, pad = data
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    packed, unpacked = sequence_batch(packs, pad), sequence_batch(examples, pad)
    assert float(packed.response_mask.sum()) == float(unpacked.response_mask.sum())
    alone = logprobs(model, unpacked)

    def compare(lp: torch.Tensor) -> tuple[float, float]:
        """(relative difference of the summed response loss, max per-token difference)."""
        ours, ref = -(lp * packed.response_mask).sum(), -(alone * unpacked.response_mask).sum()
        tok = max(float((got - alone[i, : n - 1]).abs().max())
                  for i, (got, n) in enumerate(per_example(lp, packs, examples)))
        return float((ours - ref).abs() / ref.abs()), tok

    loss_diff, token_diff = compare(logprobs(model, packed))
    assert loss_diff <= 1e-5 and token_diff <= 1e-5, (loss_diff, token_diff)

    # the defect this guards against: packed examples attending to the earlier ones
    loss_diff, token_diff = compare(logprobs(model, packed, packed=False))
    assert loss_diff > 2e-5 and token_diff > 0.05, (loss_diff, token_diff)


def test_block_causal_mask_boolean_and_additive():
    docs = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    allowed = block_causal_mask(docs)
    assert allowed.shape == (2, 1, 6, 6) and allowed.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees itself only
    assert torch.equal(allowed[0, 0], expected)
    assert allowed.any(-1).all()  # no empty softmax row, so no NaN
    for dtype in (torch.float32, torch.bfloat16):
        bias = block_causal_mask(docs, dtype)
        assert bias.dtype == dtype and bias.shape == allowed.shape
        assert torch.equal(bias == 0, allowed)
        assert (bias[~allowed] == torch.finfo(dtype).min).all()
    with pytest.raises(ValueError, match="floating dtype"):
        block_causal_mask(docs, torch.long)


def test_sequence_batch_carries_packing_through_its_parts(data):
    _, examples, packs, pad = data
    assert sequence_batch(examples, pad).position_ids is None
    assert sequence_batch(examples, pad).document_ids is None
    batch = sequence_batch(packs, pad)
    width = batch.input_ids.shape[1]
    assert batch.position_ids.shape == batch.document_ids.shape == (3, width)
    assert int(batch.document_ids.max()) == 4 and set(batch.tensors()) == {
        "input_ids", "attention_mask", "loss_mask", "position_ids", "document_ids"}
    assert torch.equal(batch.document_ids != 0, batch.attention_mask.bool())

    # micro-batches trim the all-padding columns of every (B, T) tensor alike
    short = batch.rows(slice(2, 3))
    assert short.input_ids.shape[1] == len(packs[2]) < width
    assert short.position_ids.shape == short.document_ids.shape == short.input_ids.shape
    assert short.position_ids[0].tolist() == packs[2].position_ids
    assert short.document_ids[0].tolist() == packs[2].document_ids
    for parts in (batch.split(2), batch.shards(2), [batch.select(torch.tensor([2, 0]))],
                  [batch.to("cpu")]):
        for part in parts:
            assert part.position_ids is not None and part.document_ids is not None
            assert part.position_ids.shape == part.input_ids.shape
    assert torch.equal(batch.select(torch.tensor([2, 0])).document_ids[1], batch.document_ids[0])

    # subclasses and field order: ExperienceBatch keeps its own optional fields after them
    exp = ExperienceBatch(**batch.tensors(), old_logprobs=torch.zeros(3, width - 1))
    assert torch.equal(exp.document_ids, batch.document_ids)
    assert exp.rows(slice(2, 3)).old_logprobs.shape == (1, len(packs[2]) - 1)
    names = [f.name for f in dataclasses.fields(ExperienceBatch)]
    assert names[:5] == ["input_ids", "attention_mask", "loss_mask", "position_ids",
                         "document_ids"]
