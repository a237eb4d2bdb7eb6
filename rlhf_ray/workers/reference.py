"""ReferenceServer: a frozen model that returns per-token log-probs of given episodes."""

from __future__ import annotations

from rlhf_ray.batch import Episode, PreferenceBatch, SequenceBatch
from rlhf_ray.workers.group import Worker, reuse_freed_memory, role_device, set_cpu_threads


def response_logprobs(model, episodes: list[Episode], pad_id: int, micro_batch_size: int,
                      temperature: float = 1.0, shared_prompt: bool = True) -> list[list[float]]:
    """Log-probs (A_i,) of each episode's response tokens under ``softmax(logits /
    temperature)`` of ``model``, fp32, no grad. ``shared_prompt``: episodes with the same
    prompt (a prompt's n samples) are computed as one row, the prompt once
    (:meth:`rlhf_ray.batch.SequenceBatch.shared_prompt_split`), ``micro_batch_size``
    episodes a forward."""
    import torch

    from rlhf_ray.losses import token_logprobs

    out: list[list[float]] = [[] for _ in episodes]
    batch = SequenceBatch.from_pairs([(e.prompt_ids, e.response_ids) for e in episodes], pad_id) \
        if episodes else None
    shared = batch.shared_prompt_split(micro_batch_size, pad_id) if shared_prompt and batch else None
    if shared is not None:
        for mb in shared:
            mb = mb.to(model.device)
            with torch.no_grad():
                logits, start = mb.layout.logits(model, model.dtype)
                logprobs = mb.token_logprobs(logits / temperature if temperature != 1.0 else logits,
                                             start).cpu()
            for row, i in enumerate(mb.index.tolist()):
                first = len(episodes[i].prompt_ids) - 1
                out[i] = logprobs[row, first: first + len(episodes[i].response_ids)].tolist()
        return out
    for begin in range(0, len(episodes), micro_batch_size):
        chunk = episodes[begin: begin + micro_batch_size]
        batch = SequenceBatch.from_pairs([(e.prompt_ids, e.response_ids) for e in chunk], pad_id)
        batch = batch.to(model.device)
        # logits only from the first position that predicts a response token (the shortest
        # prompt's last token) on: the prompts need no vocabulary projection
        start = min(len(e.prompt_ids) for e in chunk) - 1
        width = batch.input_ids.shape[1]
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False, logits_to_keep=width - start).logits
            # (B, width - start - 1): entry j scores token start + j + 1
            logprobs = token_logprobs(logits.float() / temperature, batch.input_ids[:, start:]).cpu()
        for i, e in enumerate(chunk):
            first = len(e.prompt_ids) - 1 - start
            out[begin + i] = logprobs[i, first: first + len(e.response_ids)].tolist()
    return out


class ReferenceServer(Worker):
    """The frozen reference policy (usually the SFT model); replicate it for throughput."""

    role = "reference"

    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 8,
                 name: str = "reference", autocast: str = "none", threads: int | None = None,
                 reserved_cpus: float = 0.0, shared_prompt: bool = True):
        """``autocast``: ``"bfloat16"`` runs the forwards under bf16 autocast, as a learner
        with ``learner.autocast=bfloat16`` does, so that a policy equal to the reference
        gets the same log-probs (a zero KL, DPO's ln 2 at the start). ``threads`` and
        ``reserved_cpus``: see :func:`rlhf_ray.workers.group.set_cpu_threads`.
        ``shared_prompt``: see :func:`response_logprobs`."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf_ray.assets import resolve_model

        self.name = name
        self.path = resolve_model(model_path, role="reference")
        self.device = role_device()
        self.threads = set_cpu_threads(threads, reserved_cpus)
        if self.device == "cpu":  # its logits are fresh blocks each call otherwise
            reuse_freed_memory()
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=getattr(torch, dtype)).eval().to(self.device)
        self.model.requires_grad_(False)
        self.pad_id = AutoTokenizer.from_pretrained(self.path).pad_token_id
        self.micro_batch_size, self.shared_prompt = micro_batch_size, shared_prompt
        if autocast not in ("none", "bfloat16"):
            raise ValueError(f"reference autocast: expected 'none' or 'bfloat16', got {autocast!r}")
        self.autocast = autocast

    def _autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast == "bfloat16")

    def logprobs(self, episodes: list[Episode], temperature: float = 1.0) -> list[list[float]]:
        """Per-token reference log-probs of each episode's response, in order, at the
        rollouts' sampling ``temperature`` (the KL compares like with like)."""
        with self._autocast():
            return response_logprobs(self.model, episodes, self.pad_id, self.micro_batch_size, temperature,
                                     self.shared_prompt)

    def sequence_logps(self, batch: SequenceBatch):
        """(B,) fp32 summed log-probs of each sequence's target tokens (``batch.loss_mask``),
        no grad: the per-response reference log-probs that DPO takes, computed exactly as
        the learner computes the policy's (:func:`rlhf_ray.losses.sequence_logprobs`)."""
        import torch

        from rlhf_ray.losses import sequence_logprobs

        out = []
        for start in range(0, len(batch), self.micro_batch_size):
            mb = batch.rows(slice(start, start + self.micro_batch_size)).to(self.device)  # no padding columns
            first = mb.first_target_column()  # logits only from the first target's position on
            window = mb.from_column(first)
            with torch.no_grad(), self._autocast():
                logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                                    logits_to_keep=mb.input_ids.shape[1] - first).logits
                out.append(sequence_logprobs(logits.float(), window.input_ids, window.loss_mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def preference_logps(self, batch: PreferenceBatch):
        """(B,), (B,) fp32 summed log-probs of each pair's chosen and rejected responses, no
        grad, as :meth:`sequence_logps` gives them: one forward per micro-batch with each
        prompt computed once (:meth:`PreferenceBatch.shared_prompt`), or one per side where
        the pairs do not share their prompts. ``micro_batch_size`` rows make
        ``micro_batch_size // 2`` pairs."""
        import torch

        chosen, rejected = [], []
        for mb in batch.split(max(1, self.micro_batch_size // 2)):
            rows = mb.shared_prompt(self.pad_id if self.pad_id is not None else 0)
            if rows is None:
                chosen.append(self.sequence_logps(mb.chosen))
                rejected.append(self.sequence_logps(mb.rejected))
                continue
            with torch.no_grad(), self._autocast():
                logps = rows.to(self.device).logps(self.model, self.model.dtype).cpu()
            chosen.append(logps[: len(mb)])
            rejected.append(logps[len(mb):])
        return torch.cat(chosen), torch.cat(rejected)

    def health(self) -> dict:
        return {**super().health(), "name": self.name, "model": self.path, "device": self.device,
                "threads": self.threads}
