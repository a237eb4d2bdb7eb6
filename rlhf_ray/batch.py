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
        """The pairs as :class:`SharedPromptRows` (each prompt once), or None where a pair's
        two rows do not start with the same prompt (the tokens before the first target), a
        row has no target, or the rows are packed: then :meth:`stacked` is the way."""
        a, b = self.chosen, self.rejected
        if a.document_ids is not None or b.document_ids is not None:
            return None
        spans = []  # (prompt length, chosen row length, rejected row length) per pair
        for i in range(len(self)):
            la, lb = int(a.attention_mask[i].sum()), int(b.attention_mask[i].sum())
            ta, tb = a.loss_mask[i, :la].nonzero(), b.loss_mask[i, :lb].nonzero()
            if not len(ta) or not len(tb):
                return None
            p = int(ta[0])
            if int(tb[0]) != p or not torch.equal(a.input_ids[i, :p], b.input_ids[i, :p]):
                return None
            spans.append((p, la, lb))
        n = len(self)
        width = max(la + lb - p for p, la, lb in spans)
        longest = max(max(la, lb) - p for p, la, lb in spans)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        segments = torch.zeros((n, width), dtype=torch.long)
        predictors = torch.zeros((2 * n, longest), dtype=torch.long)
        targets = torch.full((2 * n, longest), pad_id, dtype=torch.long)
        loss_mask = torch.zeros((2 * n, longest), dtype=torch.float32)
        for i, (p, la, lb) in enumerate(spans):
            ca, cb = la - p, lb - p  # response lengths
            input_ids[i, :la] = a.input_ids[i, :la]
            input_ids[i, la: la + cb] = b.input_ids[i, p:lb]
            position_ids[i, :la] = torch.arange(la)
            position_ids[i, la: la + cb] = torch.arange(p, lb)
            segments[i, :p], segments[i, p:la], segments[i, la: la + cb] = 1, 2, 3
            # chosen token j sits at column p + j, predicted by column p + j - 1; rejected
            # token j at la + j, predicted by la + j - 1, except its first: by the prompt's last
            predictors[i] = predictors[n + i] = p - 1  # padding entries point at a real column
            predictors[i, :ca] = torch.arange(p - 1, la - 1)
            predictors[n + i, 1:cb] = torch.arange(la, la + cb - 1)
            targets[i, :ca], loss_mask[i, :ca] = a.input_ids[i, p:la], a.loss_mask[i, p:la]
            targets[n + i, :cb], loss_mask[n + i, :cb] = b.input_ids[i, p:lb], b.loss_mask[i, p:lb]
        return SharedPromptRows(input_ids, position_ids, segments, predictors, targets, loss_mask)


@dataclass
class SharedPromptRows:
    """B preference pairs as B rows: the pair's prompt once, then its chosen response, then
    its rejected one. Each response attends to the prompt and to itself only, at the
    positions it has in its own sequence, so one forward gives both responses' log-probs
    while computing the prompt once instead of twice.

    input_ids, position_ids, segments: (B, W); segments 0 padding, 1 prompt, 2 chosen, 3 rejected.
    predictors, targets, loss_mask: (2B, A), chosen rows then rejected rows as in
        :meth:`PreferenceBatch.stacked`: the column of the row whose logits predict each
        response token, the token, and 1 where it counts (the rows' ``loss_mask``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> SharedPromptRows:
        return SharedPromptRows(*(t.to(device) for t in dataclasses.astuple(self)))

    def first_predictor(self) -> int:
        """The first column whose logits any response needs (``logits_to_keep`` from it)."""
        return int(self.predictors.min())

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, W, W) additive mask: query i sees key j <= i of the prompt or of its own
        segment; padding sees only itself (no empty softmax row)."""
        from rlhf_ray.data import block_causal_mask

        return block_causal_mask(self.segments, dtype, shared=1)

    def logps(self, model, mask_dtype: torch.dtype) -> torch.Tensor:
        """(2B,) fp32 summed log-probs of each response under ``model`` (a causal LM, or a
        DeepSpeed engine around one), from one forward over the rows with logits only from
        :meth:`first_predictor` on; grad and autocast as the caller sets them."""
        start = self.first_predictor()
        logits = model(input_ids=self.input_ids, position_ids=self.position_ids,
                       attention_mask=self.attention_mask(mask_dtype), use_cache=False,
                       logits_to_keep=self.input_ids.shape[1] - start).logits
        return self.sequence_logps(logits, start)

    def sequence_logps(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(2B,) fp32 summed log-probs of each response's counted tokens, chosen then
        rejected; logits: (B, W - start, V), the model's output on the rows from column
        ``start`` on. Only the counted tokens' columns are read, one row at a time
        (:func:`rlhf_ray.losses.picked_logprobs`): no gathered (2B, A, V) copy."""
        from rlhf_ray.losses import picked_logprobs

        n = self.input_ids.shape[0]
        response, slot = self.loss_mask.nonzero(as_tuple=True)  # the counted tokens
        logps = picked_logprobs(logits, response % n, self.predictors[response, slot] - start,
                                self.targets[response, slot])
        weights = self.loss_mask[response, slot].to(logps.dtype)
        return logps.new_zeros(2 * n).index_add_(0, response, logps * weights).float()

    def last_columns(self) -> torch.Tensor:
        """(2B,) the column of each response's last token, chosen then rejected: where a
        reward model's scalar head scores it, as it scores the end of a two-row sequence."""
        width = self.segments.shape[1]
        columns = torch.arange(width, device=self.segments.device)
        chosen = torch.where(self.segments == 2, columns, -1).amax(-1)
        rejected = torch.where(self.segments == 3, columns, -1).amax(-1)
        return torch.cat([chosen, rejected])

    def scores(self, model, mask_dtype: torch.dtype) -> torch.Tensor:
        """(2B,) fp32 scalar-head outputs of a reward model (a sequence classifier, or a
        DeepSpeed engine around one) at each response's last token, chosen then rejected,
        from one forward over the rows; grad and autocast as the caller sets them."""
        from rlhf_ray.models import token_scores

        per_token = token_scores(model, self.input_ids, self.attention_mask(mask_dtype),
                                 self.position_ids)  # (B, W)
        n = self.input_ids.shape[0]
        return per_token[torch.arange(2 * n, device=per_token.device) % n, self.last_columns()]


def _shard_slices(n_rows: int, n: int) -> list[slice]:
    if n_rows < n:
        raise ValueError(f"{n_rows} rows cannot be split over {n} learner ranks "
                         "(every rank needs at least one row)")
    sizes = [n_rows // n + (r < n_rows % n) for r in range(n)]
    starts = [sum(sizes[:r]) for r in range(n)]
    return [slice(s, s + k) for s, k in zip(starts, sizes)]
