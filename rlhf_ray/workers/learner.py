"""LearnerWorker: a DeepSpeed engine (ZeRO 0-3) in a Ray actor; one data-parallel rank.

    group = WorkerGroup(LearnerWorker, "learner", D, args=(path, cfg.learner, cfg.optim),
                        distributed=True)        # actors + set_rank_env on each
    group.call("init")                           # process group, model, engine (all ranks)
    metrics = group.call_each("sft_step", [(shard,) for shard in shards])[0]
    state = group.call("get_state_dict")[0]      # full weights on rank 0

Every training step, ``evaluate`` and (under ZeRO-3) every forward is collective: call it on
all ranks, each with its shard of the global batch.

Global normalisation. A step's loss is normalised by the GLOBAL count (response tokens for
``token_mean``, sequences for ``seq_mean``, pairs for DPO/RM), all-reduced over the ranks
unless the caller passes it. Micro-batch losses then sum to the full-batch loss over every
rank, and accumulating their gradients gives the full-batch gradient. DeepSpeed averages
gradients over the ``world_size`` ranks, so each backward uses ``loss * world_size``: the
averaged gradient equals the gradient of one rank holding the whole batch. Ranks run the
same number of micro-batches (the maximum over ranks; a rank that runs out repeats its last
micro-batch with weight 0) because ZeRO-2/3 reduce gradients inside every backward.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist

from rlhf_ray import loss_terms
from rlhf_ray.assets import resolve_model
from rlhf_ray.batch import ExperienceBatch, PreferenceBatch, SequenceBatch, SharedPromptBatch
from rlhf_ray.config import LearnerConfig, OptimConfig
from rlhf_ray.data.collate import block_causal_mask
from rlhf_ray.losses import token_logprobs
from rlhf_ray.models import load_model, sequence_scores
from rlhf_ray.workers import deepspeed_setup
from rlhf_ray.workers.group import (
    Worker,
    free_port,
    node_cores,
    release_free_memory,
    reuse_freed_memory,
)
from rlhf_ray.workers.weight_sync import WeightSender

# deepspeed is imported inside the methods that use it: it picks its accelerator when
# imported, and __init__ sets DS_ACCELERATOR first on CPU-only machines.

ModelKind = Literal["causal_lm", "reward"]
CLIENT_KEY = "rlhf_ray_client_state"  # ours, among DeepSpeed's own checkpoint entries
LossFn = Callable[[Any], loss_terms.Terms]


class TrainPlan(NamedTuple):
    """What one step (or ``evaluate``) runs: the engines it trains, each with its metric
    prefix; this rank's micro-batches; and the loss of one micro-batch."""

    engines: list[tuple[Any, str]]
    micro_batches: list
    loss_fn: LossFn


class LearnerWorker(WeightSender, Worker):
    """One learner rank: the policy (or reward model) engine and, optionally, a value engine.
    ``WeightSender`` adds the weight-sync methods (they use ``get_state_dict``)."""

    role = "learner"

    def __init__(self, model_path: str, learner: LearnerConfig, optim: OptimConfig,
                 dtype: str = "float32", model_kind: ModelKind = "causal_lm",
                 with_value: bool = False, total_steps: int | None = None, seed: int = 0,
                 value_model_path: str | None = None, value_optim: OptimConfig | None = None,
                 exclusive: bool = True):
        """``exclusive``: no other role computes while this one trains, so on a CPU it may
        use every core of its node (shared with the learner ranks there); see
        ``learner.threads``."""
        if model_kind not in ("causal_lm", "reward"):
            raise ValueError(f"learner: model_kind must be 'causal_lm' or 'reward', got {model_kind!r}")
        if with_value and model_kind != "causal_lm":
            raise ValueError("learner: with_value needs model_kind='causal_lm'")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"learner: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.zeros(2).sum()  # the first tensor call is slow; pay it at start-up
        if learner.reuse_memory and not torch.cuda.is_available():
            reuse_freed_memory()
        self.model_path, self.learner, self.optim, self.dtype = model_path, learner, optim, dtype
        self.model_kind, self.with_value, self.total_steps = model_kind, with_value, total_steps
        self.seed, self.value_model_path = seed, value_model_path
        self.exclusive = exclusive
        self.value_optim = value_optim or optim
        self.rank, self.world_size = 0, 1
        self.model = self.value = None  # DeepSpeed engines, built by init()
        self.path = self.device = None
        self.pad_id = 0
        self._hf_ds_config = None
        self._shm_file: str | None = None

    # ------------------------------------------------------------------ start and stop

    def init(self) -> dict:
        """Join the process group, load the model(s), build the engine(s). Call on all ranks."""
        t0 = time.perf_counter()
        self.path = resolve_model(self.model_path, role="learner")
        value_path = (resolve_model(self.value_model_path or self.model_path, role="learner")
                      if self.with_value else None)
        self._init_distributed()
        threads = self._set_threads()
        torch.manual_seed(self.seed)
        cfg = deepspeed_setup.ds_config(self.learner, self.optim, self.dtype)
        if self.learner.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # from_pretrained partitions at load time while this object is alive (a weakref).
            self._hf_ds_config = HfDeepSpeedConfig(cfg)
        self.model = self._engine(load_model(self.path, self.model_kind, self.dtype), self.optim)
        if value_path:
            value = load_model(value_path, "value", self.dtype)
            if self.value_model_path is None:
                # a fresh head on the policy's backbone starts at V = 0
                deepspeed_setup.zero_scalar_head(value)
            self.value = self._engine(value, self.value_optim)
        self.pad_id = self.model.module.config.pad_token_id or 0
        self.device = self.model.device
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.module.parameters())
        return {"rank": self.rank, "world_size": self.world_size, "parameters": n_params,
                "zero_stage": self.learner.zero_stage, "threads": threads,
                "init_s": time.perf_counter() - t0}

    def _set_threads(self) -> int:
        """Torch's CPU threads (``learner.threads``). Ray caps an actor at the CPUs it
        reserved (``OMP_NUM_THREADS``), often 1; when nothing else computes during training
        the rank takes its share of the node's cores instead."""
        if torch.cuda.is_available():
            return torch.get_num_threads()
        threads = self.learner.threads
        if threads is None:
            cores = node_cores()
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            threads = max(1, cores // local_ranks) if self.exclusive else max(1, int(self.learner.cpus_per_worker))
        torch.set_num_threads(threads)
        return threads

    def _init_distributed(self) -> None:
        import deepspeed

        if "RANK" not in os.environ:  # a lone learner outside a distributed WorkerGroup
            self.set_rank_env(0, 1, "127.0.0.1", free_port(), 0)
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        backend = self.learner.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0 if torch.cuda.device_count() == 1
                                  else int(os.environ.get("LOCAL_RANK", 0)))
        shm = deepspeed_setup.shm_buffer_path()
        self._shm_file = None if os.path.exists(shm) else shm  # only remove what we create
        deepspeed.init_distributed(dist_backend=backend, verbose=False)

    def _engine(self, module, optim: OptimConfig):
        import deepspeed

        if self.learner.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = deepspeed_setup.build_optimizer(module, optim)
        schedule = deepspeed_setup.lr_schedule(optim, self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        config = deepspeed_setup.ds_config(self.learner, optim, self.dtype)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=config)
        if self.world_size == 1 and self.learner.zero_stage == 0:
            # A lone ZeRO-0 rank has nothing to reduce, but DeepSpeed would still flatten
            # every gradient into one buffer and copy it back (a second copy of the grads).
            engine.enable_backward_allreduce = False
        return engine

    def shutdown(self) -> None:
        """Destroy the process group, remove this rank's DeepSpeed shm buffer and close the
        shared weights (a memfd: freed once no process maps it)."""
        self.model = self.value = self._hf_ds_config = None
        if getattr(self, "_shared_weights", None) is not None:
            self._shared_weights.close()
            self._shared_weights = None
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if self._shm_file and os.path.exists(self._shm_file):
            os.remove(self._shm_file)

    # ------------------------------------------------------------------ training steps

    def sft_step(self, batch: SequenceBatch, num_tokens_global: int | None = None,
                 aggregation: str = "token_mean", num_seqs_global: int | None = None) -> dict:
        """One optimizer step of response-only cross entropy over this rank's shard."""
        return self._train(self._sft_plan(batch, num_tokens_global, aggregation, num_seqs_global))

    def ppo_step(self, batch: ExperienceBatch,
                 settings: loss_terms.PPOLossSettings = loss_terms.PPOLossSettings(),
                 num_tokens_global: int | None = None, num_seqs_global: int | None = None,
                 train_policy: bool = True) -> dict:
        """One policy step (clipped PPO or GSPO surrogate, plus the KL loss with
        ``settings.kl_coef`` and the entropy bonus), and one value step when the learner has a
        value model. ``old_logprobs=None`` means on-policy: pi_old is this step's own
        forward (ratio 1), and ``settings`` says which corrections to apply from it. ``train_policy=False``
        (critic warm-up) steps only the value model; the policy's metrics are still reported.
        ``settings``: see :class:`rlhf_ray.loss_terms.PPOLossSettings`."""
        self._need("causal_lm", "ppo_step")
        if not train_policy and self.value is None:
            raise ValueError("learner.ppo_step: train_policy=False needs a value model")
        if batch.advantages is None:
            raise ValueError("learner.ppo_step: the batch has no advantages")
        if self.value is not None and batch.returns is None:
            raise ValueError("learner.ppo_step: a value model needs batch.returns")
        if settings.kl_coef and batch.ref_logprobs is None:
            raise ValueError("learner.ppo_step: kl_coef > 0 needs batch.ref_logprobs")
        n_tok, n_seq, real_tok = self._counts(batch.response_mask.sum(), len(batch),
                                              num_tokens_global, num_seqs_global)
        # kl/mean of a batch without old log-probs is a mean over every rank's rows
        n_rows = self._all_reduce([float(len(batch))])[0] if batch.old_logprobs is None else None

        def loss_fn(mb: ExperienceBatch | SharedPromptBatch):
            if isinstance(mb, SharedPromptBatch):  # each prompt computed once for its samples
                with torch.set_grad_enabled(train_policy and torch.is_grad_enabled()), self._autocast():
                    logits, start = mb.layout.logits(self.model, getattr(torch, self.dtype))
                if settings.temperature != 1.0:
                    logits = logits / settings.temperature
                logprobs, entropy = mb.token_logprobs(logits, start, with_entropy=True)
                losses, stats = loss_terms.ppo_terms_from_logprobs(logprobs, entropy, None, mb.rows, settings,
                                                                   n_tok, n_seq, real_tok, n_rows)
                stats["perf/tokens"] = (mb.layout.segments != 0).sum()  # the tokens computed
                return losses, stats
            # logits only from the micro-batch's first response position on: the prompt
            # prefix every row shares needs no vocabulary projection, softmax or entropy
            start = mb.first_target_column()
            values = self._values(self.value, mb)[:, start:] if self.value is not None else None
            with torch.set_grad_enabled(train_policy and torch.is_grad_enabled()):
                logits = self._forward(self.model, mb, keep_from=start).logits
            window = mb.from_column(start)
            losses, stats = loss_terms.ppo_terms(logits, values, window, settings, n_tok, n_seq, real_tok,
                                                  n_rows)
            stats["perf/tokens"] = mb.attention_mask.sum()  # of the whole micro-batch
            return (losses if train_policy else losses[1:]), stats

        engines = self._named_engines() if train_policy else [(self.value, "value")]
        # learner.shared_prompt: the samples of a prompt in one row (the prompt computed once);
        # not with a value model or an entropy bonus, which read every row's own logits
        shared = self.learner.shared_prompt and self.value is None and not settings.entropy_coef
        micro = (batch.shared_prompt_split(self.learner.micro_batch_size, self.pad_id) if shared else None) \
            or self._split(batch)
        return self._train(TrainPlan(engines, micro, loss_fn))

    def dpo_step(self, batch: PreferenceBatch, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, num_pairs_global: int | None = None) -> dict:
        """One DPO/IPO step; the batch carries the reference log-probs (summed per response)."""
        return self._train(self._dpo_plan(batch, beta, loss_type, label_smoothing, num_pairs_global))

    def rm_step(self, batch: PreferenceBatch, margin: float = 0.0,
                num_pairs_global: int | None = None) -> dict:
        """One pairwise (Bradley-Terry) step on the scalar head at the last real token."""
        return self._train(self._rm_plan(batch, margin, num_pairs_global))

    def evaluate(self, batch, kind: Literal["sft", "dpo", "rm"], **kwargs) -> dict:
        """Held-out ``eval/*`` metrics (global over ranks) without updating. Collective."""
        plans = {"sft": self._sft_plan, "dpo": self._dpo_plan, "rm": self._rm_plan}
        if kind not in plans:
            raise ValueError(f"learner.evaluate: kind must be one of {sorted(plans)}, got {kind!r}")
        plan = plans[kind](batch, **kwargs)
        for engine, _ in plan.engines:
            engine.eval()
        stats = self._loop(plan.micro_batches, plan.loss_fn, [], train=False, collective=True)
        return {f"eval/{k.split('/', 1)[1]}": v for k, v in stats.items()}

    # ------------------------------------------------------------------ loss plans

    def _sft_plan(self, batch: SequenceBatch, num_tokens_global=None, aggregation="token_mean",
                  num_seqs_global=None) -> TrainPlan:
        self._need("causal_lm", "sft")
        n_tok, n_seq, _ = self._counts(batch.response_mask.sum(), len(batch),
                                       num_tokens_global, num_seqs_global)

        def loss_fn(mb: SequenceBatch):
            # logits only from the first position that predicts a response token on
            start = mb.first_target_column()
            logits = self._forward(self.model, mb, keep_from=start).logits
            losses, stats = loss_terms.sft_terms(logits, mb.from_column(start), aggregation, n_tok, n_seq)
            stats["perf/tokens"] = mb.attention_mask.sum()  # of the whole micro-batch
            return losses, stats

        return TrainPlan([(self.model, "policy")], self._split(batch), loss_fn)

    def _dpo_plan(self, batch: PreferenceBatch, beta=0.1, loss_type="sigmoid",
                  label_smoothing=0.0, num_pairs_global=None) -> TrainPlan:
        self._need("causal_lm", "dpo")
        if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
            raise ValueError("learner dpo: the batch needs ref_chosen_logps and ref_rejected_logps "
                             "(from a ReferenceServer)")
        n = self._counts(0, len(batch), None, num_pairs_global)[1]

        def loss_fn(mb: PreferenceBatch):
            shared = mb.shared_prompt(self.pad_id) if self.learner.shared_prompt else None
            if shared is not None:  # each prompt computed once for its two responses
                shared = shared.to(self.device)
                with self._autocast():
                    logps = shared.logps(self.model, getattr(torch, self.dtype))
                return loss_terms.dpo_terms_from_logps(logps, mb, beta, loss_type, label_smoothing, n,
                                                       (shared.segments != 0).sum())
            both = mb.stacked(self.pad_id)
            start = both.first_target_column()  # the shared prompt prefix needs no logits
            logits = self._forward(self.model, both, keep_from=start).logits
            losses, stats = loss_terms.dpo_terms(logits, both.from_column(start), mb, beta, loss_type,
                                                 label_smoothing, n)
            stats["perf/tokens"] = both.attention_mask.sum()  # of the whole micro-batch
            return losses, stats

        return TrainPlan([(self.model, "policy")], self._split_pairs(batch), loss_fn)

    def _rm_plan(self, batch: PreferenceBatch, margin=0.0, num_pairs_global=None) -> TrainPlan:
        self._need("reward", "rm")
        n = self._counts(0, len(batch), None, num_pairs_global)[1]

        def loss_fn(mb: PreferenceBatch):
            shared = mb.shared_prompt(self.pad_id) if self.learner.shared_prompt else None
            if shared is not None:  # each prompt computed once for its two responses
                shared = shared.to(self.device)
                with self._autocast():
                    scores = shared.scores(self.model, getattr(torch, self.dtype))
                return loss_terms.rm_terms(scores, mb, margin, n, (shared.segments != 0).sum())
            return loss_terms.rm_terms(self._scores(self.model, mb.stacked(self.pad_id)), mb, margin, n)

        return TrainPlan([(self.model, "rm")], self._split_pairs(batch), loss_fn)

    # ------------------------------------------------------------------ the step loop

    def _train(self, plan: TrainPlan) -> dict:
        t0 = time.perf_counter()
        lrs = {prefix: float(engine.get_lr()[0]) for engine, prefix in plan.engines}
        for engine, _ in plan.engines:
            engine.train()
        metrics = self._loop(plan.micro_batches, plan.loss_fn, [e for e, _ in plan.engines],
                             train=True, collective=True)
        for engine, prefix in plan.engines:
            own_norm = None
            if not engine.zero_optimization() and not engine.bfloat16_enabled():
                # ZeRO-0 fp32 clips without recording the norm: measure the (averaged) grads.
                grads = [p.grad.detach().float().norm() for p in engine.module.parameters()
                         if p.grad is not None]
                own_norm = float(torch.stack(grads).norm()) if grads else 0.0
            engine.step()
            norm = engine.get_global_grad_norm() if own_norm is None else own_norm
            metrics[f"{prefix}/grad_norm"] = float(norm) if norm is not None else math.nan
            metrics[f"{prefix}/lr"] = lrs[prefix]
        self.release_memory()  # the step's gradients and activations
        metrics["perf/train_s"] = time.perf_counter() - t0
        return metrics

    def release_memory(self) -> None:
        """With ``learner.trim_memory``, hand freed heap memory back to the OS."""
        if self.learner.trim_memory:
            release_free_memory()

    def _loop(self, micro_batches: list, loss_fn: LossFn, engines: list, train: bool,
              collective: bool) -> dict[str, float]:
        """Run ``loss_fn`` on every micro-batch (backward when training); sum the stats over
        micro-batches and ranks. Ranks run the same number of micro-batches."""
        n = len(micro_batches)
        steps = self._steps(n, collective)
        sums: dict[str, torch.Tensor] = {}
        for i in range(steps):
            real = i < n
            mb = micro_batches[min(i, n - 1)].to(self.device)
            for engine in engines:
                engine.set_gradient_accumulation_boundary(i == steps - 1)
            with torch.set_grad_enabled(train):
                losses, stats = loss_fn(mb)
            for engine, loss in zip(engines, losses):
                engine.backward(loss * (self.world_size if real else 0.0))
            if real:
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().double()
        keys = sorted(sums)
        values = self._all_reduce([float(sums[k]) for k in keys]) if collective else \
            [float(sums[k]) for k in keys]
        return dict(zip(keys, values))

    # ------------------------------------------------------------------ inference

    def forward_logprobs(self, batch: SequenceBatch, temperature: float = 1.0):
        """(B, T-1) fp32 next-token log-probs of ``softmax(logits / temperature)``, no grad
        (0 beyond each micro-batch's width). With ``learner.shared_prompt``, rows that share
        a prompt are computed with it once, and only their response tokens (from each row's
        first target on) get log-probs: 0 at the prompt positions."""
        self._need("causal_lm", "forward_logprobs")
        shared = batch.shared_prompt_split(self.learner.micro_batch_size, self.pad_id) \
            if self.learner.shared_prompt else None
        if shared is not None:
            return self._infer_shared(shared, batch, temperature)

        return self._infer(self.model, batch, lambda mb: token_logprobs(
            self._forward(self.model, mb).logits / temperature, mb.input_ids), shift=1)

    def forward_values(self, batch: SequenceBatch):
        """(B, T-1) fp32 values: entry j is the value of the state before token j+1."""
        if self.value is None:
            raise ValueError("learner.forward_values: this learner has no value model")
        return self._infer(self.value, batch, lambda mb: self._values(self.value, mb), shift=1)

    def forward_scores(self, batch: SequenceBatch):
        """(B,) fp32 reward-head scores at each sequence's last real token."""
        self._need("reward", "forward_scores")
        return self._infer(self.model, batch, lambda mb: self._scores(self.model, mb), shift=None)

    def _infer(self, engine, batch: SequenceBatch, fn: Callable, shift: int | None):
        engine.eval()
        B, T = batch.input_ids.shape
        out = torch.zeros((B,) if shift is None else (B, T - shift), dtype=torch.float32)
        micro, order = self._sorted_split(batch)
        n = len(micro)
        # Under ZeRO-3 every forward gathers parameters: all ranks run the same count.
        steps = self._steps(n, collective=self.learner.zero_stage == 3)
        row = 0
        with torch.no_grad():
            for i in range(steps):
                res = fn(micro[min(i, n - 1)].to(self.device)).float().cpu()
                if i < n:
                    rows = order[row: row + len(micro[i])]  # back to the batch's row order
                    if shift is None:
                        out[rows] = res
                    else:
                        out[rows, : res.shape[1]] = res
                    row += len(micro[i])
        return out

    def _infer_shared(self, micro: list[SharedPromptBatch], batch: SequenceBatch, temperature: float):
        """:meth:`forward_logprobs` over micro-batches of shared-prompt rows."""
        self.model.eval()
        out = torch.zeros((len(batch), batch.input_ids.shape[1] - 1), dtype=torch.float32)
        n = len(micro)
        steps = self._steps(n, collective=self.learner.zero_stage == 3)  # ZeRO-3 gathers per forward
        with torch.no_grad():
            for i in range(steps):
                mb = micro[min(i, n - 1)].to(self.device)
                with self._autocast():
                    logits, start = mb.layout.logits(self.model, getattr(torch, self.dtype))
                res = mb.token_logprobs(logits / temperature if temperature != 1.0 else logits, start).cpu()
                if i < n:
                    out[mb.index, : res.shape[1]] = res
        return out

    def _forward(self, engine, mb: SequenceBatch, keep_from: int = 0):
        """The model's output on ``mb``; ``keep_from``: logits only at positions
        ``keep_from..T-1`` (a causal LM's ``logits_to_keep``), (B, T - keep_from, V)."""
        keep = {"logits_to_keep": mb.input_ids.shape[1] - keep_from} if keep_from else {}
        with self._autocast():
            if mb.document_ids is None:
                return engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                              use_cache=False, **keep)
            # Packed rows: every example sees only itself, at its own positions, as if alone.
            mask = block_causal_mask(mb.document_ids, getattr(torch, self.dtype))
            return engine(input_ids=mb.input_ids, attention_mask=mask, position_ids=mb.position_ids,
                          use_cache=False, **keep)

    def _values(self, engine, mb: SequenceBatch):
        return self._forward(engine, mb).logits.squeeze(-1)[:, :-1].float()

    def _scores(self, engine, mb: SequenceBatch):
        with self._autocast():
            return sequence_scores(engine, mb.input_ids, mb.attention_mask)

    def _autocast(self):
        """``learner.autocast``: bf16 matmuls over fp32 weights; the losses upcast what they
        reduce (log-softmax, entropy, scores) to fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.learner.autocast == "bfloat16")

    # ------------------------------------------------------------------ weights

    def get_state_dict(self, model: Literal["policy", "value"] = "policy") -> dict:
        """Full CPU weights (HF names) on rank 0, {} elsewhere. Collective under ZeRO-3."""
        engine = self.value if model == "value" else self.model
        if engine is None:
            raise ValueError(f"learner.get_state_dict: no {model} model")
        return deepspeed_setup.full_state_dict(engine.module, zero3=self.learner.zero_stage == 3,
                                               keep=self.rank == 0)

    def export_hf(self, path: str) -> str | None:
        """Write the policy (or reward model) as a HF folder with the tokenizer (rank 0)."""
        state = self.get_state_dict()
        if self.rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.model.module.save_pretrained(path, state_dict=state, safe_serialization=True)
            deepspeed_setup.copy_tokenizer(self.path, path)
        if self.world_size > 1:
            dist.barrier()
        return path if self.rank == 0 else None

    def save_checkpoint(self, directory: str, tag: str | None = None,
                        client_state: dict | None = None) -> str:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule) of every engine, and this
        rank's random state (dropout masks), so a resumed step draws what the straight run
        would have. All ranks."""
        for engine, name in self._named_engines():
            engine.save_checkpoint(str(Path(directory) / name), tag=tag,
                                   client_state={CLIENT_KEY: dict(client_state or {})})
        path = self._rng_path(directory, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, path)
        return directory

    def load_checkpoint(self, directory: str, tag: str | None = None) -> dict:
        """Restore what ``save_checkpoint`` wrote; returns its client_state. All ranks."""
        client_state: dict = {}
        for engine, name in self._named_engines():
            load_path, state = engine.load_checkpoint(str(Path(directory) / name), tag=tag)
            if load_path is None:
                raise FileNotFoundError(f"learner rank {self.rank}: no {name} checkpoint in "
                                        f"{Path(directory) / name} (tag {tag!r})")
            client_state = client_state or dict((state or {}).get(CLIENT_KEY, {}))
        rng_path = self._rng_path(directory, tag)
        if rng_path.exists():  # absent in checkpoints written before it was saved, or by fewer ranks
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return client_state

    def _rng_path(self, directory: str, tag: str | None) -> Path:
        """rng/<tag>/rank<r>.pt, beside the engines' <engine>/<tag>/ folders (pruned with them).
        No tag: the one DeepSpeed last saved under (its ``latest`` file)."""
        tag = tag or (Path(directory) / "policy" / "latest").read_text().strip()
        return Path(directory) / "rng" / tag / f"rank{self.rank}.pt"

    # ------------------------------------------------------------------ helpers

    def _named_engines(self) -> list:
        return [(self.model, "policy")] + ([(self.value, "value")] if self.value else [])

    def _need(self, kind: str, what: str) -> None:
        if self.model is None:
            raise RuntimeError(f"learner rank {self.rank}: call init() before {what}")
        if self.model_kind != kind:
            raise ValueError(f"learner: {what} needs model_kind={kind!r}, this learner has "
                             f"{self.model_kind!r}")

    def _split(self, batch: SequenceBatch) -> list[SequenceBatch]:
        """Micro-batches of rows of similar length (:meth:`_sorted_split`). The losses are
        sums over micro-batches with global normalisers, so the row order is free."""
        return self._sorted_split(batch)[0]

    def _sorted_split(self, batch: SequenceBatch) -> tuple[list[SequenceBatch], torch.Tensor]:
        """Micro-batches of the rows sorted by real length (stable), each cut to its own
        longest row (little padding to compute on), and the (B,) row order they follow."""
        order = torch.argsort(batch.attention_mask.sum(1), stable=True)
        return batch.select(order).split(self.learner.micro_batch_size), order

    def _split_pairs(self, batch: PreferenceBatch) -> list[PreferenceBatch]:
        return batch.split(max(1, self.learner.micro_batch_size // 2))  # 2 rows a pair

    def _counts(self, tokens, seqs: int, tokens_global, seqs_global) -> tuple[float, float, float]:
        """(token normaliser, sequence normaliser, real global tokens), all-reduced."""
        real_tok, real_seq = self._all_reduce([float(tokens), float(seqs)])
        return (float(tokens_global or real_tok), float(seqs_global or real_seq),
                max(real_tok, 1.0))

    def _steps(self, n: int, collective: bool) -> int:
        """Micro-batches to run: the maximum over ranks when the loop is collective."""
        if n == 0:
            raise ValueError(f"learner rank {self.rank}: empty batch (every rank needs rows)")
        return int(self._all_reduce([n], "max")[0]) if collective else n

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()
