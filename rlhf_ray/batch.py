"""Typed containers that cross process boundaries.

Shapes: B = sequences in a batch, T = padded sequence length (prompt + response),
A = response length. Token-aligned tensors of a ``SequenceBatch`` have shape (B, T);
per-token log-probabilities are next-token aligned and have shape (B, T-1): entry j is
log p(input_ids[:, j+1] | input_ids[:, :j+1]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch

B = TypeVar("B", bound="SequenceBatch")


@dataclass
class Episode:
    """One prompt plus one complete sampled response, as produced by a RolloutWorker."""

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_text: str
    response_text: str
    logprobs: list[float]  # (A,) log-probs of response_ids under the sampling policy
    finish_reason: str  # "stop" (EOS) or "length"
    policy_version: int  # weights version that generated the response
    prompt_index: int = 0  # which prompt of the request; equal for the n samples of one prompt
    sample_index: int = 0  # 0..n-1 within the prompt's group
    answer: str | None = None  # ground truth for checkable rewards, if the prompt had one
    score: float | None = None  # episode reward, set by the RewardServer
    ref_logprobs: list[float] | None = None  # (A,) reference log-probs, set by the ReferenceServer
    worker: str = ""  # which worker produced it (for attribution)
    # Multi-turn episodes (an environment answered the policy; see rlhf_ray.envs). None on
    # single-turn episodes, where every response token is the policy's.
    response_mask: list[int] | None = None  # (A,) 1 on policy tokens, 0 on environment tokens
    turn_ends: list[int] | None = None  # response positions of each turn's last policy token
    turn_rewards: list[float] | None = None  # each turn's reward; they sum to ``score``
    tool_calls: int = 0  # turns the environment counted as tool calls
    env_error: str | None = None  # why the environment failed (env.on_error=count)

    @property
    def turns(self) -> int:
        return len(self.turn_ends) if self.turn_ends is not None else 1

    @property
    def policy_tokens(self) -> int:
        return sum(self.response_mask) if self.response_mask is not None else len(self.response_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


# The widest row :meth:`SequenceBatch.shared_prompt_split` makes (prompt plus responses).
# Attention over a row of W tokens costs about 4 * d_model * layers * W FLOPs a token, the
# linear layers 2 * parameters: at 2048 tokens that is about half for SmolLM2-135M and a
# tenth for a 7B model of 4096 x 32, so the prompt tokens saved are not spent on attention.
SHARED_ROW_TOKENS = 2048


@dataclass
class SequenceBatch:
    """Right-padded token sequences with a mask over the tokens that count as targets.

    input_ids:      (B, T) long, prompt then response then padding
    attention_mask: (B, T) long, 1 on real tokens
    loss_mask:      (B, T) float, 1 on target (response) tokens; loss_mask[:, 0] is always 0
    position_ids:   (B, T) long or None; only for packed SFT rows (several examples in one
                    row): positions restart at 0 with each example (0 on padding)
    document_ids:   (B, T) long or None; only for packed rows: 1, 2, ... numbers the examples
                    of a row, 0 on padding. When set, the model sees each example alone
                    (a block-causal mask, :func:`rlhf_ray.data.block_causal_mask`)

    Unpacked batches leave ``position_ids`` and ``document_ids`` None: positions 0..T-1 and a
    plain causal mask over ``attention_mask``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T-1): next-token aligned mask, matching ``token_logprobs`` output."""
        return self.loss_mask[:, 1:]

    def select(self, index: slice | torch.Tensor) -> SequenceBatch:
        """Rows ``index`` (any order), every tensor kept at its full width."""
        return type(self)(**{k: v[index] for k, v in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}

    # The one rule for cutting a batch into parts: contiguous row ranges. Ranks get
    # ``shards`` at the batch's full width (their results concatenate); a rank's forward
    # passes get ``split``, with the columns that are padding in every row dropped.

    def rows(self: B, rows: slice) -> B:
        """Rows ``rows`` with all-padding columns on the right dropped: (B, T) tensors are
        cut to the last real column, next-token aligned (B, T-1) ones one shorter, (B,)
        tensors keep their shape."""
        length = self.input_ids.shape[1]
        real = self.attention_mask[rows].bool().any(0).nonzero()
        width = int(real.max()) + 1 if len(real) else 1
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
                if value.dim() >= 2 and value.shape[1] == length:
                    value = value[:, :width]
                elif value.dim() >= 2 and value.shape[1] == length - 1:
                    value = value[:, : width - 1]
            fields[f.name] = value
        return type(self)(**fields)

    def first_target_column(self) -> int:
        """The first next-token position j (of T-1) where any row has a target: the logits
        of positions before it (the shared prompt prefix) are never needed."""
        cols = self.response_mask.bool().any(0).nonzero()
        return int(cols[0]) if len(cols) else 0

    def from_column(self: B, start: int) -> B:
        """Columns ``start:`` of every (B, T) and next-token aligned (B, T-1) tensor, (B,)
        tensors kept: with :meth:`first_target_column`, the window the loss terms need, to
        pair with logits computed only there (``logits_to_keep``). Column j of the window
        is column ``start + j`` of the batch, so the alignment of the two widths holds."""
        if start == 0:
            return self
        return dataclasses.replace(self, **{k: v[:, start:] for k, v in self.tensors().items()
                                            if v.dim() >= 2})

    def split(self: B, size: int) -> list[B]:
        """Consecutive parts of at most ``size`` rows (micro-batches)."""
        return [self.rows(slice(i, i + size)) for i in range(0, len(self), size)]

    def shared_prompt_split(self, size: int, pad_id: int,
                            max_width: int = SHARED_ROW_TOKENS) -> list[SharedPromptBatch] | None:
        """Micro-batches of at most ``size`` rows in which rows that start with the same
        prompt (the tokens before their first target) are computed as one
        :class:`SharedPromptRows` row: the prompt once, then each response. A group is cut
        into parts of at most ``size`` rows and ``max_width`` tokens (a part always takes
        one row); parts of similar length go together. None where nothing would be shared
        (no two rows with one prompt), a row has no target, or the rows are packed: then
        :meth:`split` is the way.

        ``max_width``: attention over a shared row costs its width squared, where separate
        rows cost the sum of theirs; a cap keeps long responses (or many samples) from
        trading the saved prompt tokens for quadratic attention and a (W, W) mask."""
        if self.document_ids is not None:
            return None
        groups: dict[tuple[int, ...], list[int]] = {}
        spans = []  # (prompt length, row length) per row
        for i in range(len(self)):
            length = int(self.attention_mask[i].sum())
            targets = self.loss_mask[i, :length].nonzero()
            if not len(targets) or int(targets[0]) < 1:
                return None
            p = int(targets[0])
            spans.append((p, length))
            groups.setdefault(tuple(self.input_ids[i, :p].tolist()), []).append(i)
        if all(len(rows) == 1 for rows in groups.values()):
            return None
        parts: list[list[int]] = []
        for rows in groups.values():
            parts.append([])
            width = spans[rows[0]][0]  # the prompt
            for i in rows:
                response = spans[i][1] - spans[i][0]
                if parts[-1] and (len(parts[-1]) == size or width + response > max_width):
                    parts.append([])
                    width = spans[rows[0]][0]
                parts[-1].append(i)
                width += response
        tokens = [spans[rows[0]][0] + sum(spans[i][1] - spans[i][0] for i in rows) for rows in parts]
        parts = [parts[k] for k in sorted(range(len(parts)), key=tokens.__getitem__)]
        micro: list[list[list[int]]] = [[]]
        for rows in parts:
            if micro[-1] and sum(map(len, micro[-1])) + len(rows) > size:
                micro.append([])
            micro[-1].append(rows)
        out = []
        for mb in micro:
            index = torch.tensor([i for rows in mb for i in rows], dtype=torch.long)
            position = {i: r for r, i in enumerate(index.tolist())}
            layout = SharedPromptRows.pack(
                [(self.input_ids[rows[0], :spans[rows[0]][0]],
                  [(position[i], self.input_ids[i, spans[i][0]: spans[i][1]],
                    self.loss_mask[i, spans[i][0]: spans[i][1]]) for i in rows]) for rows in mb], pad_id)
            out.append(SharedPromptBatch(self.select(index).rows(slice(None)), layout, index))
        return out

    def shards(self: B, n: int) -> list[B]:
        """``n`` contiguous, near-equal parts at full width, one per learner rank (each
        needs a row)."""
        return [self.select(s) for s in _shard_slices(len(self), n)]

    def to(self: B, device: torch.device | str) -> B:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    @classmethod
    def from_pairs(cls, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
        """Build from (prompt_ids, response_ids) pairs; the loss covers the response only."""
        length = max(len(p) + len(r) for p, r in pairs)
        input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
        loss_mask = torch.zeros((len(pairs), length), dtype=torch.float32)
        for i, (prompt, response) in enumerate(pairs):
            ids = list(prompt) + list(response)
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
            loss_mask[i, len(prompt): len(ids)] = 1.0
        return cls(input_ids, attention_mask, loss_mask)


@dataclass
class ExperienceBatch(SequenceBatch):
    """A SequenceBatch plus what a policy-gradient update needs; all (B, T-1) next-token aligned.

    old_logprobs:     log-probs of the policy the PPO ratio starts from: recomputed by the
                      learners at train time (PPO's pi_old), or vLLM's when not recomputed
    rollout_logprobs: log-probs the rollout engine reported as it sampled (pi_rollout)
    ref_logprobs:     log-probs of the frozen reference
    advantages:       per-token advantages (0 outside the response)
    returns:          value targets (only for GAE / a value model)
    old_values:       value estimates at collection time (only with a value model)
    """

    old_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    policy_versions: torch.Tensor | None = None  # (B,) version that generated each episode


@dataclass
class PreferenceBatch:
    """Chosen and rejected sequences of the same prompts, row i of each forming a pair."""

    chosen: SequenceBatch
    rejected: SequenceBatch
    ref_chosen_logps: torch.Tensor | None = None  # (B,) summed reference log-probs
    ref_rejected_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    def rows(self, rows: slice) -> PreferenceBatch:
        """Pairs ``rows``; each side trimmed like :meth:`SequenceBatch.rows`."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]
        return PreferenceBatch(self.chosen.rows(rows), self.rejected.rows(rows),
                               cut(self.ref_chosen_logps), cut(self.ref_rejected_logps))

    def split(self, size: int) -> list[PreferenceBatch]:
        return [self.rows(slice(i, i + size)) for i in range(0, len(self), size)]

    def shards(self, n: int) -> list[PreferenceBatch]:
        """``n`` contiguous, near-equal parts at full width, one per learner rank."""
        def cut(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
            return None if t is None else t[s]
        return [PreferenceBatch(self.chosen.select(s), self.rejected.select(s),
                                cut(self.ref_chosen_logps, s), cut(self.ref_rejected_logps, s))
                for s in _shard_slices(len(self), n)]

    def to(self, device: torch.device | str) -> PreferenceBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return PreferenceBatch(self.chosen.to(device), self.rejected.to(device),
                               move(self.ref_chosen_logps), move(self.ref_rejected_logps))

    def stacked(self, pad_id: int) -> SequenceBatch:
        """Chosen rows then rejected rows in one right-padded (2B, T) batch (one forward)."""
        a, b = self.chosen, self.rejected
        length = max(a.input_ids.shape[1], b.input_ids.shape[1])

        def cat(x: torch.Tensor, y: torch.Tensor, value: float) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value),
                              torch.nn.functional.pad(y, (0, length - y.shape[1]), value=value)])

        return SequenceBatch(cat(a.input_ids, b.input_ids, pad_id),
                             cat(a.attention_mask, b.attention_mask, 0),
                             cat(a.loss_mask, b.loss_mask, 0.0))

    def shared_prompt(self, pad_id: int) -> SharedPromptRows | None:
        """The pairs as :class:`SharedPromptRows` (each prompt once, then the chosen response,
        then the rejected one; responses 0..B-1 chosen, B..2B-1 rejected), or None where a
        pair's two rows do not start with the same prompt (the tokens before the first
        target), a row has no target, or the rows are packed: then :meth:`stacked` is the way."""
        a, b = self.chosen, self.rejected
        if a.document_ids is not None or b.document_ids is not None:
            return None
        n = len(self)
        rows = []
        for i in range(n):
            la, lb = int(a.attention_mask[i].sum()), int(b.attention_mask[i].sum())
            ta, tb = a.loss_mask[i, :la].nonzero(), b.loss_mask[i, :lb].nonzero()
            if not len(ta) or not len(tb):
                return None
            p = int(ta[0])
            if p < 1 or int(tb[0]) != p or not torch.equal(a.input_ids[i, :p], b.input_ids[i, :p]):
                return None
            rows.append((a.input_ids[i, :p], [(i, a.input_ids[i, p:la], a.loss_mask[i, p:la]),
                                              (n + i, b.input_ids[i, p:lb], b.loss_mask[i, p:lb])]))
        return SharedPromptRows.pack(rows, pad_id)


@dataclass
class SharedPromptRows:
    """Responses that continue the same prompt, laid out as rows: a prompt once, then each
    of its responses. Each response attends to the prompt and to itself only, at the
    positions it has in its own sequence (prompt then response), so one forward gives every
    response's log-probs while computing the prompt once instead of once per response.
    Preference pairs (:meth:`PreferenceBatch.shared_prompt`) and the samples of a prompt
    group (:meth:`SequenceBatch.shared_prompt_split`) both use it.

    input_ids, position_ids, segments: (N, W); segments 0 padding, 1 prompt, 2, 3, ... the
        row's responses in order.
    response_rows, response_segments, response_lengths: (R,) the row, the segment and the
        token count of each response r.
    predictors, targets, loss_mask: (R, A): for token j of response r, the column of its row
        whose logits predict it, the token, and 1 where it counts (the loss mask the response
        came with); beyond the response's length: the prompt's last column, padding and 0.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    response_rows: torch.Tensor
    response_segments: torch.Tensor
    response_lengths: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    @classmethod
    def pack(cls, rows: list[tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]],
             pad_id: int) -> SharedPromptRows:
        """``rows``: one per row, ``(prompt ids (P,), responses)``, each response
        ``(r, ids (A_r,), loss mask (A_r,))`` with ``r`` its index among all R responses
        (0..R-1, each once, in any order). Every prompt needs a token (P >= 1)."""
        n_responses = sum(len(responses) for _, responses in rows)
        width = max(len(p) + sum(len(ids) for _, ids, _ in responses) for p, responses in rows)
        longest = max([len(ids) for _, responses in rows for _, ids, _ in responses] + [1])
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segments = torch.zeros((len(rows), width), dtype=torch.long)
        response_rows, response_segments, response_lengths = (
            torch.full((n_responses,), -1, dtype=torch.long) for _ in range(3))
        predictors = torch.zeros((n_responses, longest), dtype=torch.long)
        targets = torch.full((n_responses, longest), pad_id, dtype=torch.long)
        loss_mask = torch.zeros((n_responses, longest), dtype=torch.float32)
        for i, (prompt, responses) in enumerate(rows):
            p = len(prompt)
            if p < 1:
                raise ValueError(f"SharedPromptRows.pack: row {i} has an empty prompt")
            input_ids[i, :p], position_ids[i, :p], segments[i, :p] = torch.as_tensor(prompt), torch.arange(p), 1
            column = p
            for k, (r, ids, mask) in enumerate(responses):
                a = len(ids)
                if response_rows[r] != -1:
                    raise ValueError(f"SharedPromptRows.pack: response index {r} given twice")
                span = slice(column, column + a)
                input_ids[i, span], position_ids[i, span], segments[i, span] = \
                    torch.as_tensor(ids), torch.arange(p, p + a), 2 + k
                response_rows[r], response_segments[r], response_lengths[r] = i, 2 + k, a
                # token j sits at column + j and is predicted by column + j - 1, except its
                # first: by the prompt's last column. Padding entries point at a real column.
                predictors[r] = p - 1
                predictors[r, 1:a] = torch.arange(column, column + a - 1)
                targets[r, :a], loss_mask[r, :a] = torch.as_tensor(ids), torch.as_tensor(mask, dtype=torch.float32)
                column += a
        if (response_rows == -1).any():
            raise ValueError(f"SharedPromptRows.pack: response indices must be 0..{n_responses - 1}")
        return cls(input_ids, position_ids, segments, response_rows, response_segments, response_lengths,
                   predictors, targets, loss_mask)

    def to(self, device: torch.device | str) -> SharedPromptRows:
        return SharedPromptRows(*(t.to(device) for t in dataclasses.astuple(self)))

    def __len__(self) -> int:
        """R, the responses."""
        return self.response_rows.shape[0]

    def first_predictor(self) -> int:
        """The first column whose logits any response needs (``logits_to_keep`` from it)."""
        return int(self.predictors.min())

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, 1, W, W) additive mask: query i sees key j <= i of the prompt or of its own
        segment; padding sees only itself (no empty softmax row)."""
        from rlhf_ray.data import block_causal_mask

        return block_causal_mask(self.segments, dtype, shared=1)

    def logits(self, model, mask_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """``(logits, start)``: ``model``'s (a causal LM, or a DeepSpeed engine around one)
        (N, W - start, V) output on the rows, with logits only from ``start =``
        :meth:`first_predictor` on; grad and autocast as the caller sets them."""
        start = self.first_predictor()
        logits = model(input_ids=self.input_ids, position_ids=self.position_ids,
                       attention_mask=self.attention_mask(mask_dtype), use_cache=False,
                       logits_to_keep=self.input_ids.shape[1] - start).logits
        return logits, start

    def logps(self, model, mask_dtype: torch.dtype) -> torch.Tensor:
        """(R,) fp32 summed log-probs of each response's counted tokens under ``model``,
        from one forward (:meth:`logits`)."""
        return self.sequence_logps(*self.logits(model, mask_dtype))

    def sequence_logps(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(R,) fp32 summed log-probs of each response's counted tokens; logits: (N, W -
        start, V), the model's output on the rows from column ``start`` on. Only the counted
        tokens' columns are read, one row at a time (:func:`rlhf_ray.losses.picked_logprobs`):
        no gathered (R, A, V) copy."""
        from rlhf_ray.losses import picked_logprobs

        response, slot = self.loss_mask.nonzero(as_tuple=True)  # the counted tokens
        logps = picked_logprobs(logits, self.response_rows[response], self.predictors[response, slot] - start,
                                self.targets[response, slot])
        weights = self.loss_mask[response, slot].to(logps.dtype)
        return logps.new_zeros(len(self)).index_add_(0, response, logps * weights).float()

    def token_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(response, slot)``, (K,) each: every token of every response (slot < its length)."""
        slots = torch.arange(self.targets.shape[1], device=self.targets.device)
        return (slots < self.response_lengths[:, None]).nonzero(as_tuple=True)

    def last_columns(self) -> torch.Tensor:
        """(R,) the column of each response's last token: where a reward model's scalar head
        scores it, as it scores the end of a sequence of its own."""
        columns = torch.arange(self.segments.shape[1], device=self.segments.device)
        own = self.segments[self.response_rows] == self.response_segments[:, None]  # (R, W)
        return torch.where(own, columns, -1).amax(-1)

    def scores(self, model, mask_dtype: torch.dtype) -> torch.Tensor:
        """(R,) fp32 scalar-head outputs of a reward model (a sequence classifier, or a
        DeepSpeed engine around one) at each response's last token, from one forward over
        the rows; grad and autocast as the caller sets them."""
        from rlhf_ray.models import token_scores

        per_token = token_scores(model, self.input_ids, self.attention_mask(mask_dtype),
                                 self.position_ids)  # (N, W)
        return per_token[self.response_rows, self.last_columns()]


@dataclass
class SharedPromptBatch:
    """Rows of a :class:`SequenceBatch` (or :class:`ExperienceBatch`) that share prompts,
    with the :class:`SharedPromptRows` that computes each prompt once for them: response r
    of ``layout`` is row r of ``rows``. ``index`` (B,): each row's index in the batch it
    was cut from."""

    rows: SequenceBatch
    layout: SharedPromptRows
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        return SharedPromptBatch(self.rows.to(device), self.layout.to(device), self.index)

    def token_logprobs(self, logits: torch.Tensor, start: int = 0, with_entropy: bool = False):
        """(B, T-1) fp32 next-token aligned log-probs of ``rows`` from the layout's ``logits``
        ((N, W - start, V), as :meth:`SharedPromptRows.logits` gives them), at the columns
        the rows' response tokens have (0 elsewhere); with ``with_entropy`` also the (B, T-1)
        entropy (no gradient). One :func:`rlhf_ray.losses.picked_logprobs` pass."""
        from rlhf_ray.losses import picked_logprobs

        rows = self.layout
        response, slot = rows.token_slots()
        picked = picked_logprobs(logits, rows.response_rows[response], rows.predictors[response, slot] - start,
                                 rows.targets[response, slot], with_entropy=with_entropy)
        picked = picked if with_entropy else (picked,)
        # token j of row r's response is next-token column (prompt length - 1) + j; the
        # layout's first predictor of each response is its prompt's last column, p - 1
        b, width = self.rows.input_ids.shape
        columns = rows.predictors[response, 0] + slot
        placed = [x.new_zeros(b, width - 1).index_put((response, columns), x) for x in picked]
        return tuple(placed) if with_entropy else placed[0]


def _shard_slices(n_rows: int, n: int) -> list[slice]:
    if n_rows < n:
        raise ValueError(f"{n_rows} rows cannot be split over {n} learner ranks "
                         "(every rank needs at least one row)")
    sizes = [n_rows // n + (r < n_rows % n) for r in range(n)]
    starts = [sum(sizes[:r]) for r in range(n)]
    return [slice(s, s + k) for s, k in zip(starts, sizes)]
