"""Methods added to every vLLM worker process (``LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker, so ``self`` is the vLLM worker and these methods are
called through ``llm.collective_rpc(name, args=...)``. Tensors inside ``collective_rpc``
arguments arrive as Python lists, so weights travel as a file path (on ``/dev/shm``).
"""

from __future__ import annotations


class WeightLoaderExtension:
    def load_weights_from_file(self, path: str) -> int:
        """Load a ``torch.save``-d ``{name: tensor}`` dict in place; returns the tensor count."""
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
