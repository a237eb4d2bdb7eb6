"""Typed containers that cross process boundaries.

Shapes: B = sequences in a batch, T = padded sequence length (prompt + response),
A = response length. Token-aligned tensors of a ``SequenceBatch`` have shape (B, T);
per-token log-probabilities are next-token aligned and have shape (B, T-1): entry j is
log p(input_ids[:, j+1] | input_ids[:, :j+1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class SequenceBatch:
    """Right-padded token sequences with a mask over the tokens that count as targets.

    input_ids:      (B, T) long, prompt then response then padding
    attention_mask: (B, T) long, 1 on real tokens
    loss_mask:      (B, T) float, 1 on target (response) tokens; loss_mask[:, 0] is always 0
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T-1): next-token aligned mask, matching ``token_logprobs`` output."""
        return self.loss_mask[:, 1:]

    def select(self, index: slice | torch.Tensor) -> SequenceBatch:
        return type(self)(**{k: v[index] for k, v in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}

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

    old_logprobs: log-probs of the behaviour policy (recomputed by the learner or from vLLM)
    ref_logprobs: log-probs of the frozen reference
    advantages:   per-token advantages (0 outside the response)
    returns:      value targets (only for GAE / a value model)
    old_values:   value estimates at collection time (only with a value model)
    """

    old_logprobs: torch.Tensor | None = None
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
