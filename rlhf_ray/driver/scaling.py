"""Scale rollout workers while a job runs.

The driver of an online recipe owns a small named actor, ``ScaleControl``, in the
``rlhf_ray`` namespace under the name ``scale:<run name>``. ``rlhf-ray scale`` (from any
machine that reaches the cluster) sets the wanted number of rollout workers; the driver
reads it between steps, starts new workers (and gives them the current weights) or stops
idle ones. Learners are never touched.
"""

from __future__ import annotations

import ray

NAMESPACE = "rlhf_ray"


@ray.remote(num_cpus=0)
class ScaleControl:
    def __init__(self, rollout: int):
        self.rollout = rollout

    def set_rollout(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"rollout workers: expected at least 1, got {n}")
        self.rollout = n
        return n

    def get_rollout(self) -> int:
        return self.rollout


def control_name(run_name: str) -> str:
    return f"scale:{run_name}"


def open_control(run_name: str, rollout: int):
    """The run's control actor (created if missing; an existing one keeps its wanted size)."""
    return ScaleControl.options(name=control_name(run_name), namespace=NAMESPACE,
                                get_if_exists=True, lifetime=None).remote(rollout)


def set_rollout_workers(run_name: str, n: int) -> int:
    """From a client connected to the job's cluster: ask the run for ``n`` rollout workers."""
    try:
        control = ray.get_actor(control_name(run_name), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no running job named '{run_name}' accepts scaling "
                         f"(looked for actor '{control_name(run_name)}' in namespace '{NAMESPACE}')") from None
    return ray.get(control.set_rollout.remote(n), timeout=30)


def apply(control, rollouts, stream, sync, version: int) -> dict[str, float]:
    """Between steps: grow or shrink the rollout group toward the wanted size.

    New workers get the current weights before any chunk. Scaling in drains: the surplus
    ranks (the group's tail) get no new chunks, and each is stopped once its chunks in
    flight are done (now, or at a later step)."""
    wanted = ray.get(control.get_rollout.remote(), timeout=30)
    have = len(rollouts)
    if wanted >= have:
        stream.drain(None)
    if wanted > have:
        ranks = rollouts.add(wanted - have)
        sync.push(ranks, version)  # the new workers start from the current weights
        stream.grow()
    elif wanted < have:
        stream.drain(wanted)
        idle = stream.idle_tail(wanted)
        if idle:
            rollouts.remove(idle)
            stream.shrink(idle)
    return {"rollout/num_workers": float(len(rollouts)),
            "rollout/draining_workers": float(len(rollouts) - wanted if wanted < len(rollouts) else 0)}
