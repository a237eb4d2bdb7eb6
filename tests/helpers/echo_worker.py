"""A trivial role for WorkerGroup tests (importable by Ray workers via PYTHONPATH)."""

import os
import time

from rlhf_ray.workers.group import Worker


class EchoWorker(Worker):
    role = "echo"

    def __init__(self, tag: str = "", start_delay_s: float = 0.0):
        time.sleep(start_delay_s)  # a slow start (imports, model load)
        self.tag = tag
        self.stopped = False

    def echo(self, value):
        return (self.tag, value, os.getpid())

    def env(self) -> dict:
        return {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}

    def fail(self, message: str):
        raise ValueError(message)

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def shutdown(self) -> None:
        self.stopped = True
