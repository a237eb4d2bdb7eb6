"""The one rule for cutting batches: contiguous row ranges (shards for ranks at full width,
micro-batches trimmed of all-padding columns), checked against a naive loop."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch, PreferenceBatch, SequenceBatch


def lengths_batch(lengths: list[int], pad: int = 0) -> ExperienceBatch:
    base = SequenceBatch.from_pairs([([1], list(range(2, 2 + n))) for n in lengths], pad)
    t = base.input_ids.shape[1]
    return ExperienceBatch(base.input_ids, base.attention_mask, base.loss_mask,
                           old_logprobs=torch.randn(len(lengths), t - 1),
                           policy_versions=torch.arange(len(lengths)))


@pytest.mark.parametrize("rows, ranks", [(5, 2), (7, 3), (4, 4), (9, 1)])
def test_shards_are_contiguous_near_equal_and_full_width(rows, ranks):
    batch = lengths_batch([1 + i % 3 for i in range(rows)])
    shards = batch.shards(ranks)
    # naive: deal rows out in order, the first rows % ranks shards one row longer
    expected, start = [], 0
    for r in range(ranks):
        size = rows // ranks + (1 if r < rows % ranks else 0)
        expected.append(list(range(start, start + size)))
        start += size
    assert [s.policy_versions.tolist() for s in shards] == expected
    assert all(s.input_ids.shape[1] == batch.input_ids.shape[1] for s in shards)
    assert torch.equal(torch.cat([s.old_logprobs for s in shards]), batch.old_logprobs)


def test_too_few_rows_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="2 rows cannot be split over 3 learner ranks"):
        lengths_batch([1, 2]).shards(3)


def test_micro_batches_drop_only_all_padding_columns():
    batch = lengths_batch([1, 1, 6, 2])
    parts = batch.split(2)
    assert [len(p) for p in parts] == [2, 2]
    assert parts[0].input_ids.shape[1] == 2 and parts[1].input_ids.shape[1] == 7  # 1 prompt + response
    assert parts[0].old_logprobs.shape[1] == 1 and parts[1].old_logprobs.shape[1] == 6
    for part, rows in zip(parts, (slice(0, 2), slice(2, 4))):
        width = part.input_ids.shape[1]
        assert torch.equal(part.input_ids, batch.input_ids[rows, :width])
        assert torch.equal(part.old_logprobs, batch.old_logprobs[rows, : width - 1])
        assert batch.attention_mask[rows, width:].sum() == 0  # nothing real was cut


def test_preference_batches_cut_both_sides_alike():
    chosen = SequenceBatch.from_pairs([([1], [2, 3]), ([1], [2]), ([1], [2, 3, 4])], 0)
    rejected = SequenceBatch.from_pairs([([1], [5]), ([1], [5, 6, 7, 8]), ([1], [5])], 0)
    batch = PreferenceBatch(chosen, rejected, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]))
    shards = batch.shards(2)
    assert [s.ref_chosen_logps.tolist() for s in shards] == [[1.0, 2.0], [3.0]]
    assert [s.ref_rejected_logps.tolist() for s in shards] == [[4.0, 5.0], [6.0]]
    stacked = batch.stacked(pad_id=0)
    assert stacked.input_ids.shape == (6, 5)
    assert torch.equal(stacked.input_ids[3:, :5], rejected.input_ids)
