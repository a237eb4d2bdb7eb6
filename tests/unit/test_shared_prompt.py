"""DPO's shared-prompt forward gives each response the log-probs the two-row forward gives it.

``PreferenceBatch.shared_prompt`` lays a pair out as one row, the prompt once and then both
responses, with each response's own positions and a mask that keeps it to the prompt and to
itself. Checked on the tiny Llama against ``stacked`` (chosen and rejected as separate rows):
the summed log-probs and their gradients agree, and a mask that lets the rejected response
see the chosen one is caught.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.batch import PreferenceBatch, SequenceBatch
from rlhf_ray.driver.batches import preference_batch
from rlhf_ray.losses import sequence_logprobs

PAD = 0


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    from rlhf_ray.assets import TINY_LLAMA, ensure

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(ensure(TINY_LLAMA), dtype=torch.float32).eval()


def pairs(seed: int = 0) -> PreferenceBatch:
    """Four pairs with prompts of different lengths and responses of different lengths
    (one chosen longer than its rejected, one shorter, one a single token)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=g).tolist()

    shapes = [(7, 5, 3), (12, 2, 6), (4, 1, 4), (9, 6, 6)]
    return preference_batch([(ids(p), ids(c), ids(r)) for p, c, r in shapes], PAD)


def stacked_logps(model, batch: PreferenceBatch) -> torch.Tensor:
    both = batch.stacked(PAD)
    logits = model(input_ids=both.input_ids, attention_mask=both.attention_mask, use_cache=False).logits
    return sequence_logprobs(logits, both.input_ids, both.loss_mask)


def shared_logps(model, batch: PreferenceBatch, mask_fn=None) -> torch.Tensor:
    rows = batch.shared_prompt(PAD)
    start = rows.first_predictor()
    mask = (mask_fn or rows.attention_mask)(torch.float32)
    logits = model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=mask,
                   use_cache=False, logits_to_keep=rows.input_ids.shape[1] - start).logits
    return rows.sequence_logps(logits, start)


def test_the_layout_holds_each_prompt_once():
    batch = pairs()
    rows = batch.shared_prompt(PAD)
    both = batch.stacked(PAD)
    assert int((rows.segments != 0).sum()) == int(both.attention_mask.sum()) - (7 + 12 + 4 + 9)
    assert rows.segments[0].tolist()[:7 + 5 + 3] == [1] * 7 + [2] * 5 + [3] * 3
    # the rejected response restarts at the prompt's length
    assert rows.position_ids[0, 12:15].tolist() == [7, 8, 9]
    assert rows.loss_mask.sum() == both.loss_mask.sum()


def test_log_probs_and_gradients_equal_the_two_row_forward(model):
    batch = pairs()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.5])  # chosen then rejected

    model.zero_grad()
    ref = stacked_logps(model, batch)
    (ref * weights).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    got = shared_logps(model, batch)
    (got * weights).sum().backward()
    got_grads = [p.grad.clone() for p in model.parameters()]

    assert ref.shape == got.shape == (8,)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
    for r, g in zip(ref_grads, got_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_a_rejected_response_that_sees_the_chosen_one_is_caught(model):
    """The check can fail: a plain causal mask over the row lets the rejected response
    attend to the chosen one, which moves its log-probs."""
    batch = pairs()
    rows = batch.shared_prompt(PAD)

    def causal_only(dtype):
        width = rows.input_ids.shape[1]
        allowed = torch.ones(width, width, dtype=torch.bool).tril()[None].expand(len(batch), -1, -1)
        allowed = allowed & (rows.segments != 0)[:, None, :] | torch.eye(width, dtype=torch.bool)
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    with torch.no_grad():
        ref, wrong = stacked_logps(model, batch), shared_logps(model, batch, causal_only)
    torch.testing.assert_close(wrong[:4], ref[:4], atol=1e-5, rtol=1e-6)  # chosen: same view
    assert (wrong[4:] - ref[4:]).abs().max() > 1e-3


def test_pairs_that_do_not_share_a_prompt_fall_back():
    batch = pairs()
    assert batch.shared_prompt(PAD) is not None
    other = preference_batch([([5, 6, 7], [8, 9], [10]), ([5, 6, 7], [8], [11, 12])], PAD)
    other.rejected.input_ids[1, 1] = 42  # the second pair's rejected row has another prompt
    assert other.shared_prompt(PAD) is None
    empty = preference_batch([([5, 6, 7], [8, 9], [10])], PAD)
    empty.rejected.loss_mask.zero_()  # a response with no target (truncated away)
    assert empty.shared_prompt(PAD) is None


def test_the_reference_gives_each_side_what_a_forward_per_side_gives(ray_local, tiny_llama):
    """``ReferenceServer.preference_logps`` (each prompt once, in micro-batches of pairs)
    equals ``sequence_logps`` on each side, and pairs that do not share a prompt take that
    way instead."""
    from rlhf_ray.workers.reference import ReferenceServer

    ref = ReferenceServer(tiny_llama, micro_batch_size=4)  # 2 pairs a forward: 2 micro-batches
    batch = pairs(seed=3)
    chosen, rejected = ref.preference_logps(batch)
    torch.testing.assert_close(chosen, ref.sequence_logps(batch.chosen), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rejected, ref.sequence_logps(batch.rejected), atol=1e-5, rtol=1e-6)

    batch.rejected.input_ids[2, 0] = 201  # pair 2 no longer shares its prompt
    assert batch.shared_prompt(PAD) is None
    chosen, rejected = ref.preference_logps(batch)
    torch.testing.assert_close(rejected, ref.sequence_logps(batch.rejected), atol=1e-5, rtol=1e-6)


def test_picked_log_probs_and_their_gradient_match_autograd():
    """The hand-written backward of ``picked_logprobs`` (a column may predict two targets,
    as the shared prompt's last column does) equals autograd through log-softmax."""
    from rlhf_ray.losses import picked_logprobs

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    cols = torch.tensor([1, 1, 4, 0, 2, 3, 0])  # (0, 1) and (1, 0) predict two targets each
    targets = torch.tensor([3, 7, 7, 1, 10, 0, 1])
    weights = torch.randn(7, generator=g, dtype=torch.float64)

    got = picked_logprobs(logits, rows, cols, targets)
    (got * weights).sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None
    ref = torch.log_softmax(logits, -1)[rows, cols, targets]
    (ref * weights).sum().backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, logits.grad)
    assert got_grad[0, 0].abs().max() == 0  # a column nothing reads gets no gradient
    assert torch.autograd.gradcheck(lambda z: picked_logprobs(z, rows, cols, targets), (logits.detach().requires_grad_(),))
    with pytest.raises(ValueError, match="rows, cols, targets"):
        picked_logprobs(logits, rows, cols[:3], targets)


@pytest.fixture(scope="module")
def reward_model():
    from rlhf_ray.assets import TINY_LLAMA, ensure
    from rlhf_ray.models import load_model

    torch.manual_seed(0)
    return load_model(ensure(TINY_LLAMA), "reward").eval()


def test_reward_scores_and_gradients_equal_the_two_row_forward(reward_model):
    """A reward model scores each response at its last token in the shared row as it does
    at the end of the response's own row, and the gradients of any weighting agree."""
    from rlhf_ray.models import sequence_scores

    batch = pairs(seed=5)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5, -0.25, 1.0, -2.0, 0.75])

    reward_model.zero_grad()
    both = batch.stacked(PAD)
    ref = sequence_scores(reward_model, both.input_ids, both.attention_mask)
    (ref * weights).sum().backward()
    ref_grads = [p.grad.clone() for p in reward_model.parameters()]

    reward_model.zero_grad()
    got = batch.shared_prompt(PAD).scores(reward_model, torch.float32)
    (got * weights).sum().backward()
    got_grads = [p.grad.clone() for p in reward_model.parameters()]

    assert got.shape == ref.shape == (8,)
    assert (ref[:4] - ref[4:]).abs().min() > 1e-4  # the two sides really score differently
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for r, g in zip(ref_grads, got_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_reward_scores_read_each_response_at_its_own_last_token():
    rows = pairs().shared_prompt(PAD)
    # pair 0: prompt 7, chosen 5, rejected 3 -> chosen ends at column 11, rejected at 14
    assert rows.last_columns()[[0, 4]].tolist() == [11, 14]
    # pair 2: prompt 4, chosen 1, rejected 4 -> columns 4 and 8
    assert rows.last_columns()[[2, 6]].tolist() == [4, 8]


# --------------------------------------------------------------------------- prompt groups
# A prompt's n samples (GRPO, RLOO, best-of-n) as one row: the prompt once, then each sample.


def groups(seed: int = 0, shuffle: bool = True) -> SequenceBatch:
    """Three prompts with 4, 3 and 1 samples of different lengths (one a single token),
    rows in shuffled order, right-padded."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=g).tolist()

    pairs = []
    for p, lengths in ((6, (5, 1, 7, 3)), (9, (2, 4, 4)), (4, (6,))):
        prompt = ids(p)
        pairs += [(prompt, ids(a)) for a in lengths]
    order = torch.randperm(len(pairs), generator=g).tolist() if shuffle else range(len(pairs))
    return SequenceBatch.from_pairs([pairs[i] for i in order], PAD)


def test_split_puts_each_prompt_once_and_every_row_once():
    batch = groups()
    micro = batch.shared_prompt_split(4, PAD)
    assert sum(len(mb) for mb in micro) == len(batch) == 8
    assert sorted(torch.cat([mb.index for mb in micro]).tolist()) == list(range(8))
    assert all(len(mb) <= 4 for mb in micro)
    # three prompts, each computed once: 6 + 9 + 4 prompt tokens instead of 6*4 + 9*3 + 4
    computed = sum(int((mb.layout.segments != 0).sum()) for mb in micro)
    assert computed == int(batch.attention_mask.sum()) - 6 * 3 - 9 * 2
    for mb in micro:  # rows are the batch's rows, response r of the layout is row r
        torch.testing.assert_close(mb.rows.input_ids, batch.select(mb.index).rows(slice(None)).input_ids)
    # a group larger than the micro-batch is cut into parts, each with the prompt
    assert max(len(mb) for mb in batch.shared_prompt_split(2, PAD)) == 2


def test_split_falls_back_where_nothing_is_shared():
    batch = groups()
    assert SequenceBatch.from_pairs([([5, 6], [7]), ([5, 8], [9])], PAD).shared_prompt_split(4, PAD) is None
    no_target = groups()
    no_target.loss_mask[3].zero_()
    assert no_target.shared_prompt_split(4, PAD) is None
    packed = groups()
    packed.document_ids = packed.attention_mask.clone()
    assert packed.shared_prompt_split(4, PAD) is None
    assert batch.shared_prompt_split(4, PAD) is not None


def plain_logprobs(model, batch: SequenceBatch, temperature: float = 1.0):
    from rlhf_ray.losses import token_logprobs

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return token_logprobs(logits / temperature, batch.input_ids, with_entropy=True)


def test_group_log_probs_entropy_and_gradients_equal_one_row_per_sample(model):
    batch = groups(seed=2)
    mask = batch.response_mask
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)) * mask

    model.zero_grad()
    ref, ref_entropy = plain_logprobs(model, batch, 0.8)
    (ref * weights).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    got = torch.zeros_like(ref)
    got_entropy = torch.zeros_like(ref)
    for mb in batch.shared_prompt_split(3, PAD):
        logits, start = mb.layout.logits(model, torch.float32)
        logprobs, entropy = mb.token_logprobs(logits / 0.8, start, with_entropy=True)
        width = logprobs.shape[1]
        (logprobs * weights[mb.index, :width]).sum().backward()
        got[mb.index, :width], got_entropy[mb.index, :width] = logprobs.detach(), entropy
    got_grads = [p.grad.clone() for p in model.parameters()]

    torch.testing.assert_close(got * mask, ref.detach() * mask, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_entropy * mask, ref_entropy * mask, atol=1e-5, rtol=1e-6)
    assert (got * (1 - mask)).abs().max() == 0  # prompt positions are not computed
    for r, g in zip(ref_grads, got_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_samples_that_see_each_other_are_caught(model):
    """The check can fail: with a plain causal mask over a group's row, a sample attends
    to the samples before it, and its log-probs move."""
    batch = groups(seed=2, shuffle=False)
    mb = batch.shared_prompt_split(4, PAD)[-1]  # the four samples of the first prompt
    rows = mb.layout
    width = rows.input_ids.shape[1]
    allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & (rows.segments != 0)[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=mask,
                       use_cache=False).logits
        wrong = mb.token_logprobs(logits)
        ref = plain_logprobs(model, mb.rows)[0]
    response = mb.rows.response_mask
    assert len(mb) == 4
    assert masked_max(wrong - ref, response) > 1e-3
    # the first sample in the row sees only the prompt either way
    first = (rows.response_segments == 2).nonzero()[0].item()
    assert masked_max(wrong[first] - ref[first], response[first]) < 1e-5


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x.abs() * mask).max())


def test_the_reference_gives_group_samples_what_one_row_each_gives(tiny_llama):
    """The reference's log-probs (``response_logprobs``) with each prompt computed once
    equal those of one row per episode, at a sampling temperature, in micro-batches that
    cut a group."""
    from rlhf_ray.batch import Episode
    from rlhf_ray.workers.reference import response_logprobs

    batch = groups(seed=4)
    episodes = []
    for i in range(len(batch)):
        p = int(batch.loss_mask[i].nonzero()[0])
        length = int(batch.attention_mask[i].sum())
        episodes.append(Episode(batch.input_ids[i, :p].tolist(), batch.input_ids[i, p:length].tolist(),
                                "", "", [], "stop", 0))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    shared = response_logprobs(reference, episodes, PAD, 3, temperature=0.7)
    rows = response_logprobs(reference, episodes, PAD, 3, temperature=0.7, shared_prompt=False)
    assert [len(x) for x in shared] == [len(e.response_ids) for e in episodes]
    for a, b in zip(shared, rows):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-6)


def test_a_width_cap_cuts_groups_and_keeps_the_log_probs(model):
    """``max_width`` cuts a group into rows of at most that many tokens (a row always takes
    one response, however long), each with the prompt; the log-probs stay those of one row
    per sample."""
    batch = groups(seed=6)
    micro = batch.shared_prompt_split(4, PAD, max_width=14)
    widths = [int((row != 0).sum()) for mb in micro for row in mb.layout.segments]
    responses = [int((mb.layout.response_rows == r).sum()) for mb in micro for r in range(len(mb.layout.input_ids))]
    assert all(w <= 14 or n == 1 for w, n in zip(widths, responses))
    assert max(responses) > 1  # some rows still share their prompt
    assert len(widths) > 3  # more rows than the three prompts
    mask = batch.response_mask
    with torch.no_grad():
        ref = plain_logprobs(model, batch)[0]
        for mb in micro:
            got = mb.token_logprobs(*mb.layout.logits(model, torch.float32))
            torch.testing.assert_close(got * mb.rows.response_mask, ref[mb.index, : got.shape[1]] *
                                       mask[mb.index, : got.shape[1]], atol=1e-5, rtol=1e-6)
