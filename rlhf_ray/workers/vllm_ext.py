"""Methods added to every vLLM worker process (``LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker, so ``self`` is the vLLM worker and these methods are
called through ``llm.collective_rpc(name, args=...)``. An engine in the caller's process
takes a state dict as it is; to engine processes, tensors inside ``collective_rpc`` arguments
arrive as Python lists, so weights travel as a file path (on ``/dev/shm``).
"""

from __future__ import annotations

import os

from rlhf_ray.workers.decode_attention import ENV_FLAG, use

if os.environ.get(ENV_FLAG) == "1":  # an engine process of a worker that runs the decode kernel
    use(True)


class WeightLoaderExtension:
    def decode_attention_calls(self) -> int:
        """Layers whose decode attention this engine process's CPU kernel computed."""
        from rlhf_ray.workers import decode_attention

        return decode_attention.calls

    def load_weights_from_file(self, path: str) -> int:
        """Load a ``torch.save``-d ``{name: tensor}`` dict in place; returns the tensor count."""
        import torch

        return self.load_weights_from_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def load_weights_from_dict(self, state: dict) -> int:
        """Load ``{name: tensor}`` in place (an engine in this process: no copy to a file)."""
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(state)

    def load_weights_from_shared(self, handle: dict) -> int:
        """Load from the learner's shared-memory buffer (mapped once per buffer, then views)."""
        from rlhf_ray.workers.weight_sync import SharedReader

        if getattr(self, "_shared_reader", None) is None:
            self._shared_reader = SharedReader()
        return self.load_weights_from_dict(self._shared_reader.views_of(handle))

    def open_sync_group(self, master_addr: str, port: int, first_rank: int, world_size: int,
                        backend: str) -> bool:
        """Join the learner's weight-broadcast group; each tensor-parallel shard is one rank."""
        from rlhf_ray.workers.weight_sync import open_group

        rank = first_rank + int(getattr(self, "rank", 0))
        self._sync_group, self._sync_store = open_group(master_addr, port, rank, world_size, backend)
        return True

    def receive_weights(self, metadata: list, bucket_bytes: int) -> int:
        """Receive broadcast buckets and load them in place; returns the tensor count."""
        import torch

        from rlhf_ray.workers.weight_sync import broadcast_recv

        device = "cuda" if torch.cuda.is_available() else "cpu"
        metadata = [(name, dtype, list(shape)) for name, dtype, shape in metadata]
        self.reload_weights(weights_iterator=broadcast_recv(self._sync_group, metadata,
                                                            bucket_bytes, device))
        return len(metadata)
