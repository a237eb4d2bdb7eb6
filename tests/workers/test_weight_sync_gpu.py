"""The NCCL path of the bucketed weight broadcast (GPU machines only; skipped on CPU).

On CPU the same code runs over gloo in test_weight_sync.py, end to end into vLLM."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rank(rank: int, port: int, results) -> None:
    from rlhf_ray.workers.weight_sync import (
        broadcast_recv,
        broadcast_send,
        open_group,
        tensor_metadata,
    )

    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    state = {"w": torch.randn(1000, 64), "b": torch.randn(64).to(torch.bfloat16), "i": torch.arange(7)}
    group, _store = open_group("127.0.0.1", port, rank, 2, "nccl")
    if rank == 0:
        broadcast_send(group, state, bucket_bytes=64 << 10, device="cuda")
    else:
        got = dict(broadcast_recv(group, tensor_metadata(state), bucket_bytes=64 << 10, device="cuda"))
        results.put(all(torch.equal(got[k].cpu(), v) for k, v in state.items()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one per rank)")
def test_nccl_bucketed_broadcast_delivers_exact_tensors():
    import torch.multiprocessing as mp

    from rlhf_ray.workers.group import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs)
    assert results.get(timeout=5) is True
