"""Starting the workers of each role, and shutting them down again.

:class:`Roles` is the one place a recipe starts workers: one method per role, each placing
its Ray actors from that role's own sub-config. It connects to Ray (or starts a private
one) before the first worker and owns every group it started: on exit, on an error or on
SIGTERM it shuts them down in reverse order, then closes the Ray session it opened.

    with Roles(cfg.ray, worker_env()) as roles:
        rollouts = roles.rollouts(policy_path, cfg.rollout, cfg.model.dtype, cfg.seed)
        learners = roles.learners(policy_path, cfg.learner, cfg.optim, cfg.model.dtype, ...)

Inside ``with roles.together():`` the roles start side by side: each method launches its
workers and returns, and the block's end waits for all of them, in the order they were
asked for. A job's start then takes about as long as its slowest role, not their sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from rlhf_ray.config import (
    EnvConfig,
    LearnerConfig,
    OptimConfig,
    RayConfig,
    ReferenceConfig,
    RewardConfig,
    RolloutConfig,
)
from rlhf_ray.files import sweep_scratch
from rlhf_ray.runtime import check_resources, ray_session
from rlhf_ray.workers.group import WorkerGroup, WorkerResources
from rlhf_ray.workers.learner import LearnerWorker
from rlhf_ray.workers.reference import ReferenceServer
from rlhf_ray.workers.reward import RewardServer
from rlhf_ray.workers.rollout import RolloutWorker


class Roles:
    """Starts the workers of each role and owns them until exit."""

    def __init__(self, ray: RayConfig, env: dict[str, str] | None = None,
                 on_connect: Callable[[], None] | None = None):
        """``on_connect``: called once Ray is up (``ray.init`` installs signal handlers of
        its own; the run puts its SIGTERM handler back there)."""
        self.ray, self.env, self.on_connect = ray, env, on_connect
        self.groups: list[WorkerGroup] = []
        # role -> where each worker it started ran (node id, ip, pid, GPUs): for summary.json
        self.placements: dict[str, list[dict]] = {}
        self.resolved: dict[str, dict] = {}  # settings as the workers resolved them (vLLM's)
        self._cleanups: list[Callable[[], None]] = []  # run before the groups stop
        self._session = contextlib.ExitStack()
        self._connected = False
        self._unfinished: list[Callable[[], None]] | None = None  # inside together(): waits still due

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every group, newest first, then the Ray session this object opened."""
        try:
            while self._cleanups:
                self._cleanups.pop()()
            while self.groups:
                self.groups.pop().shutdown()
        finally:
            self._session.close()
            self._connected = False
            sweep_scratch()  # the scratch folders of this node's workers that were killed

    @contextlib.contextmanager
    def together(self):
        """Start every role asked for in this block at once; the block's end waits for them.

        Their processes import, load models and initialise side by side. The waits run in
        the order the roles were asked for, so the first role's failure is the one raised
        (the others are then shut down with the rest). Nested blocks join the outer one."""
        if self._unfinished is not None:
            yield
            return
        self._unfinished = []
        try:
            yield
            while self._unfinished:
                self._unfinished.pop(0)()
        finally:
            self._unfinished = None

    def on_shutdown(self, cleanup: Callable[[], None]) -> None:
        """Also run ``cleanup`` at shutdown (before the groups stop), e.g. to kill a helper actor."""
        self._cleanups.append(cleanup)

    # ------------------------------------------------------------------ the roles

    def rollouts(self, model: str, rollout: RolloutConfig, dtype: str, seed: int,
                 env: EnvConfig | None = None) -> WorkerGroup:
        """``rollout.num_workers`` vLLM engines serving ``model`` (in ``rollout.dtype``, or
        ``dtype`` when that is null); with ``env``, their episodes are multi-turn."""
        group = self._start(RolloutWorker, "rollout", rollout.num_workers,
                            args=(model, rollout, rollout.dtype or dtype, seed, "rollout", env),
                            keys={"CPU": "rollout.cpus_per_worker", "GPU": "rollout.gpus_per_worker"},
                            resources=WorkerResources(rollout.cpus_per_worker, rollout.gpus_per_worker,
                                                      custom=dict(rollout.resources),
                                                      placement=rollout.placement),
                            then=self._record_engine)
        return group

    def _record_engine(self, rollouts: WorkerGroup) -> None:
        self.resolved["rollout_engine"] = rollouts.call("health")[0]["engine"]  # for summary.json

    def reward(self, reward: RewardConfig) -> WorkerGroup:
        """``reward.num_replicas`` RewardServers (a reward model, a function, a remote
        endpoint, or a sum of them), each placed by the ``reward`` section."""
        return self._start(RewardServer, "reward", reward.num_replicas,
                           args=(reward, reward.dtype or "float32"),
                           keys={"CPU": "reward.cpus_per_replica", "GPU": "reward.gpus_per_replica"},
                           resources=WorkerResources(reward.cpus_per_replica, reward.gpus_per_replica,
                                                     custom=dict(reward.resources)))

    def reference(self, model: str, dtype: str, reference: ReferenceConfig | None = None,
                  autocast: str = "none") -> WorkerGroup:
        """``reference.num_replicas`` frozen ReferenceServers of ``model`` (in
        ``reference.dtype``, or ``dtype`` when that is null), placed by ``reference``;
        ``autocast``: the learners' ``learner.autocast``, so both compute alike."""
        reference = reference or ReferenceConfig()
        return self._start(ReferenceServer, "reference", reference.num_replicas,
                           args=(model, reference.dtype or dtype, reference.micro_batch_size),
                           kwargs=dict(autocast=autocast, threads=reference.threads,
                                       reserved_cpus=reference.cpus_per_replica,
                                       shared_prompt=reference.shared_prompt),
                           keys={"CPU": "reference.cpus_per_replica", "GPU": "reference.gpus_per_replica"},
                           resources=WorkerResources(reference.cpus_per_replica, reference.gpus_per_replica,
                                                     custom=dict(reference.resources)))

    def learners(self, model: str, learner: LearnerConfig, optim: OptimConfig, dtype: str, *,
                 optimizer_steps: int | None, seed: int, model_kind: str = "causal_lm",
                 value_model: str | None = None, value_optim: OptimConfig | None = None,
                 exclusive: bool = True) -> WorkerGroup:
        """``learner.num_workers`` DeepSpeed ranks, initialised. ``optimizer_steps``: the
        optimizer steps of the whole run, for the LR schedule (None: a constant schedule).
        ``value_optim`` set: each rank also trains a value model (from ``value_model``, or the
        policy's backbone). ``exclusive``: no other role computes while they train (their
        CPU threads then default to the node's cores, see ``learner.threads``)."""
        def init(group: WorkerGroup) -> None:
            ranks = group.call("init")
            self.resolved["learner"] = {"threads": [r["threads"] for r in ranks]}  # for summary.json

        group = self._start(LearnerWorker, "learner", learner.num_workers, distributed=True, then=init,
                            args=(model, learner, optim, dtype, model_kind),
                            kwargs=dict(with_value=value_optim is not None, total_steps=optimizer_steps,
                                        seed=seed, value_model_path=value_model,
                                        value_optim=value_optim, exclusive=exclusive),
                            keys={"CPU": "learner.cpus_per_worker", "GPU": "learner.gpus_per_worker"},
                            resources=WorkerResources(learner.cpus_per_worker, learner.gpus_per_worker,
                                                      custom=dict(learner.resources),
                                                      placement=learner.placement))
        return group

    # ------------------------------------------------------------------ helpers

    def _start(self, actor_cls: type, role: str, num_workers: int,
               keys: dict[str, str] | None = None, then: Callable[[WorkerGroup], None] | None = None,
               **options) -> WorkerGroup:
        """``keys``: the config key of each resource the role reserves (for the error when a
        private local Ray cannot hold the group). ``then``: a call to make on the started
        group before it is ready (e.g. the learners' init); inside :meth:`together` both wait
        until the block ends."""
        if not self._connected:
            self._session.enter_context(ray_session(self.ray, self.env))
            self._connected = True
            if self.on_connect is not None:
                self.on_connect()
        if self.ray.address == "local":
            r = options.get("resources") or WorkerResources()
            held = {"CPU": sum(g.resources.num_cpus * g.reserved for g in self.groups),
                    "GPU": sum(g.resources.num_gpus * g.reserved for g in self.groups)}
            check_resources(role, num_workers, {"CPU": r.num_cpus, "GPU": r.num_gpus}, held,
                            keys or {})
        group = WorkerGroup(actor_cls, role, num_workers, timeout_s=self.ray.call_timeout_s,
                            start_timeout_s=self.ray.start_timeout_s, wait=False, **options)
        self.groups.append(group)  # from launch on: shutdown() stops it whatever happens next

        def finish() -> None:
            group.wait_started()
            self.placements.setdefault(role, []).extend(
                {"rank": rank, **{k: info[k] for k in ("node_id", "ip", "host", "pid", "gpu_ids")}}
                for rank, info in enumerate(group.infos))
            if then is not None:
                then(group)

        if self._unfinished is None:
            finish()
        else:
            self._unfinished.append(finish)
        return group
