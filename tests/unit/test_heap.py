"""The allocator settings the CPU workers use: freed memory kept for reuse, and handed back
on request (``learner.reuse_memory``, ``learner.trim_memory``)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, torch
from rlhf_ray.workers.group import release_free_memory, reuse_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def churn():  # a step's worth of large temporaries, freed again
    x = torch.ones(64 << 20)  # 256 MiB
    del x

out = {"start": rss_mib()}
churn()
out["default"] = rss_mib()
out["applied"] = reuse_freed_memory()
churn()
out["reuse"] = rss_mib()
release_free_memory()
out["trimmed"] = rss_mib()
print(json.dumps(out))
"""


def test_freed_memory_is_kept_for_reuse_and_trimmed_on_request():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["applied"] is True
    # glibc's default: a 256 MiB block is its own mapping, unmapped on free
    assert rss["default"] - rss["start"] < 64, rss
    # reuse: the block stays in the heap after free (the next step takes it back, no faults)
    assert rss["reuse"] - rss["start"] > 200, rss
    # trim_memory's release hands it back
    assert rss["reuse"] - rss["trimmed"] > 200, rss
