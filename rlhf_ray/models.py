"""Load policy, reward and value models, and read a scalar head at the right token.

transformers is imported inside the functions, so importing this module stays cheap.

Scoring convention: a reward (or value) model's score of a sequence is its scalar head at the
sequence's LAST REAL TOKEN (the last position with ``attention_mask == 1``). transformers'
own sequence-classifier pooling takes the last token that is not ``pad_token_id``; with our
models eos == pad, so it would skip a final ``<|im_end|>``. Score with :func:`sequence_scores`
everywhere (learner and reward server) so training and serving agree.
"""

from __future__ import annotations

from typing import Literal

import torch

ModelKind = Literal["causal_lm", "reward", "value"]


def load_model(path: str, kind: ModelKind, dtype: str = "float32") -> torch.nn.Module:
    """A transformers model from a HF folder.

    ``causal_lm``: the policy. ``reward``: a sequence classifier with one label. ``value``: a
    backbone with a per-token scalar head (``AutoModelForTokenClassification``, one label,
    dropout off); from a causal LM folder the head starts random, from a reward model folder
    it starts as the reward head.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    torch_dtype = getattr(torch, dtype)
    if kind == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if kind == "reward":
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                  dtype=torch_dtype)
    if kind == "value":
        config = AutoConfig.from_pretrained(path, num_labels=1, classifier_dropout=0.0)
        return AutoModelForTokenClassification.from_pretrained(path, config=config,
                                                               dtype=torch_dtype)
    raise ValueError(f"unknown model kind {kind!r}; expected causal_lm, reward or value")


def scalar_head(model: torch.nn.Module) -> torch.nn.Module:
    """The per-token scalar head of a sequence or token classifier (``score`` in Llama-likes)."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no 'score' head; reward and value models "
                         "must be Llama-style classifiers")
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with ``attention_mask == 1`` (either padding side)."""
    return attention_mask.shape[-1] - 1 - attention_mask.flip(-1).argmax(-1)


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) fp32 scalar-head output at every position.

    ``model`` may be the classifier itself or a wrapper that calls it (a DeepSpeed engine:
    pass the engine, its ``.module`` must be the classifier). ``attention_mask`` is (B, T),
    or a (B, 1, T, T) additive mask with ``position_ids`` for rows that hold more than one
    sequence. Gradients flow through.
    """
    inner = getattr(model, "module", model)
    captured: list[torch.Tensor] = []
    hook = scalar_head(inner).register_forward_hook(lambda mod, args, out: captured.append(out))
    extra = {} if position_ids is None else {"position_ids": position_ids}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        hook.remove()
    return captured[-1].squeeze(-1).float()


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 scalar-head outputs at each row's last real token (see :func:`token_scores`)."""
    per_token = token_scores(model, input_ids, attention_mask)
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last_token_index(attention_mask)]
