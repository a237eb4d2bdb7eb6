"""Every config tree: the shared sections, then one root dataclass per recipe.

Defaults live here, each with a one-line doc; YAML in ``launch/configs`` holds overrides
only (the loading mechanics are in ``rlhf_ray.config_loader``). Each worker receives its own
sub-config (``RolloutConfig``, ``LearnerConfig`` ...), never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_ray.config_loader import ConfigError, option, section

Dtype = Literal["float32", "bfloat16"]


# --------------------------------------------------------------------------- shared parts


def check_placement(section: str, count_key: str, count: int, cpus_key: str, cpus: float,
                    gpus_key: str, gpus: float, resources: dict) -> None:
    """The placement keys every role has: a count, CPUs, GPUs (fractional: roles can share
    a GPU) and custom Ray resources (node pools, labels)."""
    if count < 1:
        raise ConfigError(f"{section}.{count_key}: expected at least 1, got {count}")
    if cpus < 0 or gpus < 0:
        raise ConfigError(f"{section}.{cpus_key} and {section}.{gpus_key}: expected >= 0, got {cpus} and {gpus}")
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"{section}.{gpus_key}: a fraction of a GPU must be below 1, got {gpus}")
    for name, amount in resources.items():
        if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(f"{section}.resources: expected a mapping of resource name to a positive "
                              f"amount, e.g. {{rollout_node: 1}}; got {name!r}: {amount!r}")
        if name in ("CPU", "GPU", "memory"):
            raise ConfigError(f"{section}.resources.{name}: set {section}.{cpus_key if name == 'CPU' else gpus_key} instead")



@dataclass
class RayConfig:
    address: str = option("local", "Ray address: 'local' starts a private Ray; 'auto' or ray://host:port joins a cluster.")
    num_cpus: int | None = option(None, "CPUs for a local Ray (null: all cores).")
    object_store_mb: int = option(1024, "Object store size for a local Ray, in MiB.")
    call_timeout_s: float = option(600.0, "Timeout for every remote call; the error names the worker.")
    start_timeout_s: float = option(600.0, "Timeout for a worker to start (placement, process, imports, model load); the error names the worker.")
    log_to_driver: bool = option(True, "Print worker logs on the driver's console.")


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = option("offline", "W&B mode: offline writes a local run folder; online needs WANDB_API_KEY.")
    project: str = option("rlhf-ray", "W&B project name.")
    run_name: str | None = option(None, "W&B run name (null: the run folder's name).")
    group: str | None = option(None, "W&B group (e.g. one sweep or one pipeline; null: none).")
    tags: list[str] = option([], "W&B tags.")
    system_metrics: bool = option(True, "W&B system metrics (CPU, memory, GPU) of the driver's machine.")
    log_every: int = option(1, "Log metrics every N steps.")
    samples_every: int = option(0, "Every N steps, log a table of sample episodes (prompt, response, reward, KL, version) to W&B and samples.jsonl (0: never).")
    samples_per_table: int = option(8, "Episodes in each samples table.")
    progress_bar: bool = option(True, "Show a progress bar on the console.")

    def validate(self) -> None:
        if self.log_every < 1 or self.samples_every < 0 or self.samples_per_table < 1:
            raise ConfigError(f"logging: expected log_every >= 1, samples_every >= 0 and samples_per_table >= 1, "
                              f"got {self.log_every}, {self.samples_every} and {self.samples_per_table}")


@dataclass
class ModelConfig:
    path: str = option("tiny-llama", "Model: a built asset name (see `rlhf-ray assets`) or a Hugging Face folder.")
    dtype: Dtype = option("float32", "Parameter dtype for training and inference.")


@dataclass
class DataConfig:
    source: str = option("arithmetic", "Data: a file (.jsonl/.json/.parquet/.csv), a save_to_disk folder, or a built-in source name.")
    format: Literal["instruction", "conversation", "prompt", "preference"] = option("instruction", "Row format expected in the source.")
    template: Literal["alpaca", "chat"] = option("alpaca", "Prompt template: the Alpaca template or the tokenizer's chat template.")
    max_length: int = option(512, "Maximum tokens of prompt plus response.")
    truncation: Literal["drop", "truncate"] = option("drop", "What to do with a row longer than max_length.")
    skip_invalid: bool = option(False, "Drop invalid rows (counted and reported) instead of stopping at the first.")
    num_rows: int | None = option(None, "Use only the first N rows (null: all).")
    heldout_fraction: float = option(0.1, "Fraction of rows held out for evaluation (deterministic split).")
    seed: int = option(0, "Seed for built-in generators, splits and shuffling.")
    packing: bool = option(False, "Pack several SFT rows into one sequence.")

    def validate(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction: expected 0 <= x < 1, got {self.heldout_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: expected at least 8 tokens, got {self.max_length}")


@dataclass
class OptimConfig:
    lr: float = option(1e-5, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: list[float] = option([0.9, 0.95], "AdamW betas.")
    warmup_steps: int = option(0, "Linear warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = option("constant", "LR schedule after warm-up.")
    grad_clip: float = option(1.0, "Gradient-norm clip (0 disables).")
    eps: float = option(1e-8, "AdamW epsilon.")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: expected a positive learning rate, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {self.betas}")


@dataclass
class LearnerConfig:
    num_workers: int = option(1, "Data-parallel DeepSpeed learner ranks.")
    zero_stage: Literal[0, 1, 2, 3] = option(0, "DeepSpeed ZeRO stage.")
    micro_batch_size: int = option(4, "Sequences per forward/backward on each rank.")
    offload: bool = option(False, "Offload optimizer state to CPU (ZeRO >= 1).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    shared_prompt: bool = option(True, "Run a prompt once for the responses that continue it, each response attending to the prompt and to itself only (one row, a segment mask): DPO and reward-model pairs (chosen and rejected), and a prompt's samples in PPO/GRPO updates and pi_old passes (not with a value model or an entropy bonus). Rows that share no prompt fall back to one row each.")
    reuse_memory: bool = option(True, "Keep the memory a step frees in the process for the next step (glibc mallopt: no per-block mmap, no automatic trim) instead of faulting fresh pages in each step (a DPO step of SmolLM2-135M on a 2-core VM: 8.4 -> 6.8 s). trim_memory still hands it back where set.")
    trim_memory: bool = option(False, "After each optimizer step and weight publish, hand the memory they freed back to the OS (glibc malloc_trim): a smaller resident size between steps, for nodes where other roles need it, paid for by faulting the pages in again next step (on a 2-core VM: 18 -> 34 s of training per GRPO bench step).")
    cpus_per_worker: float = option(1.0, "Ray CPUs reserved per learner.")
    gpus_per_worker: float = option(0.0, "Ray GPUs reserved per learner (0 on CPU machines).")
    placement: Literal["none", "pack", "spread"] = option("none", "Placement group for the learners: pack (same node first) or spread.")
    resources: dict[str, float] = option({}, "Custom Ray resources per learner, e.g. {trainer_node: 1}: places learners on the nodes that have them.")
    backend: Literal["auto", "gloo", "nccl"] = option("auto", "torch.distributed backend: auto picks nccl on GPU, gloo on CPU.")
    autocast: Literal["none", "bfloat16"] = option("none", "Run the learner's forward and backward under bf16 autocast: fp32 weights, optimizer state and loss, bf16 matmuls (about 1.8x faster on a CPU with AVX-512 BF16; a few hundredths of a nat of log-prob noise per token, bench/RESULTS.md). The ratio and KL still compare like with like: pi_old is computed the same way, and the reference (PPO, DPO) runs under the same autocast.")
    threads: int | None = option(None, "Torch CPU threads per learner rank (CPU only). null: the cores of its node, shared among the learner ranks there, when no other role computes during training (sft, rm, dpo, rs; ppo with max_staleness=0); else cpus_per_worker (at least 1).")

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"learner.threads: expected at least 1 or null, got {self.threads}")
        check_placement("learner", "num_workers", self.num_workers, "cpus_per_worker", self.cpus_per_worker,
                        "gpus_per_worker", self.gpus_per_worker, self.resources)
        if self.micro_batch_size < 1:
            raise ConfigError(f"learner.micro_batch_size: expected at least 1, got {self.micro_batch_size}")
        if self.offload and self.zero_stage == 0:
            raise ConfigError("learner.offload: needs learner.zero_stage >= 1, got 0")


@dataclass
class SamplingConfig:
    max_new_tokens: int = option(128, "Maximum tokens generated per response.")
    temperature: float = option(1.0, "Sampling temperature (0 is greedy).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    top_k: int = option(-1, "Top-k sampling (-1 disables).")
    n: int = option(1, "Responses sampled per prompt.")
    seed: int | None = option(None, "Sampling seed (null: random).")

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"sampling.n: expected at least 1, got {self.n}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p: expected 0 < top_p <= 1, got {self.top_p}")


@dataclass
class RolloutConfig:
    num_workers: int = option(1, "vLLM rollout workers (scale independently of the learners).")
    tensor_parallel_size: int = option(1, "vLLM tensor-parallel size per worker: GPUs, or on a CPU engine processes that split the worker's cores between them.")
    max_model_len: int = option(1024, "vLLM context length (prompt plus response).")
    trim_memory: bool = option(False, "After each weight load, hand the memory the engine freed while loading back to the OS (glibc malloc_trim): a smaller resident size, paid for by faulting the pages in again at the next load (on a 2-core VM about 1 s of a GRPO step's sync).")
    kv_cache_gib: float | None = option(None, "KV-cache size on CPU in GiB, fractions allowed (null: what max_num_seqs sequences of max_model_len tokens need, at most 1 GiB; a VLLM_CPU_KVCACHE_SPACE in the environment overrides it).")
    gpu_memory_utilization: float = option(0.5, "Fraction of GPU memory vLLM may take (GPU).")
    enforce_eager: bool | None = option(None, "vLLM eager mode, no CUDA graphs (null: true on CPU, false on GPU).")
    max_num_seqs: int | None = option(None, "Most sequences vLLM runs at once (null: vLLM's default).")
    enable_prefix_caching: bool = option(False, "vLLM prefix caching (shares the KV cache of the prompt among a group's n samples).")
    decode_attention: bool = option(True, "CPU: decode batches' attention runs rlhf-ray's kernel (prefetches the next sequence's KV while it computes; about 2x vLLM's on a cold cache) where it builds (a C compiler, AVX-512F) and agrees with vLLM's kernel; false, or any other case: vLLM's. summary.json's rollout_engine.decode_attention says which ran.")
    cpus_per_worker: float = option(0.5, "Ray CPUs reserved per rollout worker.")
    gpus_per_worker: float = option(0.0, "Ray GPUs reserved per rollout worker.")
    placement: Literal["none", "pack", "spread"] = option("none", "Placement group for the rollout workers: pack or spread.")
    resources: dict[str, float] = option({}, "Custom Ray resources per rollout worker, e.g. {rollout_node: 1}.")
    dtype: Literal["float32", "bfloat16"] | None = option(None, "vLLM weights dtype (null: model.dtype); bf16 rollouts with fp32 learners need rollout_correction.")

    @property
    def eager(self) -> bool:
        """``enforce_eager`` resolved: eager on CPU, CUDA graphs on GPU."""
        return self.gpus_per_worker == 0 if self.enforce_eager is None else self.enforce_eager

    def validate(self) -> None:
        check_placement("rollout", "num_workers", self.num_workers, "cpus_per_worker", self.cpus_per_worker,
                        "gpus_per_worker", self.gpus_per_worker, self.resources)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.gpu_memory_utilization: expected 0 < x <= 1, got {self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ConfigError(f"rollout.kv_cache_gib: expected a size in GiB > 0, got {self.kv_cache_gib}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"rollout.max_num_seqs: expected at least 1 (or null), got {self.max_num_seqs}")


@dataclass
class RewardConfig:
    model: str | None = option(None, "Reward model: an asset name or folder of a sequence classifier (null: none).")
    function: str | None = option(None, "Reward function: a built-in checker name or 'module:function' (null: none).")
    num_replicas: int = option(1, "RewardServer replicas (requests go round-robin).")
    cpus_per_replica: float = option(0.0, "Ray CPUs reserved per RewardServer.")
    gpus_per_replica: float = option(0.0, "Ray GPUs per RewardServer; a fraction shares a GPU with another role. >0 runs the reward model on the GPU.")
    resources: dict[str, float] = option({}, "Custom Ray resources per RewardServer, e.g. {rm_node: 1}.")
    dtype: Dtype | None = option(None, "Reward model dtype (null: float32).")
    normalize: bool = option(False, "Normalise scores with the mean/std stored in the reward model's config.")
    clip: float | None = option(None, "Clip scores to [-clip, clip] (null: no clip).")
    micro_batch_size: int = option(16, "Episodes scored per forward pass.")
    threads: int | None = option(None, "Torch CPU threads of a RewardServer's reward model (CPU only). null: cpus_per_replica when at least 1, else the cores of its node.")
    url: str | None = option(None, "Remote reward endpoint speaking the `rlhf-ray serve-rm` API, e.g. http://host:8000 (null: none). Added to the model's and function's scores.")
    url_token_env: str = option("RLHF_RAY_REWARD_TOKEN", "Environment variable that holds the endpoint's bearer token (read by the reward worker, never stored; unset: no token sent).")
    url_timeout_s: float = option(30.0, "Timeout of one request to reward.url, in seconds.")
    url_retries: int = option(3, "Retries of a request to reward.url that failed to connect, timed out or got 429/502/503/504 (backoff doubles from 0.5 s).")

    @property
    def is_set(self) -> bool:
        return bool(self.model or self.function or self.url)

    def validate(self) -> None:
        if self.function and ":" not in self.function and not self.function.isidentifier():
            raise ConfigError(f"reward.function: expected a built-in name or 'module:function', got {self.function!r}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.url: expected an http:// or https:// address, got {self.url!r}")
        check_placement("reward", "num_replicas", self.num_replicas, "cpus_per_replica", self.cpus_per_replica,
                        "gpus_per_replica", self.gpus_per_replica, self.resources)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"reward.threads: expected at least 1 or null, got {self.threads}")
        if self.url_timeout_s <= 0 or self.url_retries < 0:
            raise ConfigError(f"reward.url_timeout_s must be > 0 and reward.url_retries >= 0, "
                              f"got {self.url_timeout_s} and {self.url_retries}")


@dataclass
class EnvConfig:
    name: str | None = option(None, "Environment for multi-turn episodes: calculator, guess, or 'module:Class' (null: single-turn, scored by reward).")
    kwargs: dict = option({}, "Keyword arguments for the environment's constructor.")
    max_turns: int = option(4, "Policy turns per episode at most (each ends at EOS, a stop string of the environment, or sampling.max_new_tokens).")
    step_timeout_s: float = option(10.0, "Seconds one reset or step call may take; past it the call counts as failed.")
    on_error: Literal["raise", "count"] = option("raise", "An environment that raises, hangs or returns the wrong types: stop the job with an error naming it, the prompt and the turn (raise), or end that episode with failure_reward and count it in env/errors (count).")
    failure_reward: float = option(0.0, "on_error=count: the score of an episode whose environment failed.")
    threads: int = option(8, "Threads per rollout worker that run environment calls (a slow environment does not stall the engine).")

    @property
    def is_set(self) -> bool:
        return bool(self.name)

    def validate(self) -> None:
        if self.name and ":" not in self.name and self.name not in ("calculator", "guess"):
            raise ConfigError(f"env.name: expected calculator, guess or 'module:Class', got {self.name!r}")
        if self.max_turns < 1 or self.threads < 1:
            raise ConfigError(f"env.max_turns and env.threads: expected at least 1, got {self.max_turns} and "
                              f"{self.threads}")
        if self.step_timeout_s <= 0:
            raise ConfigError(f"env.step_timeout_s: expected > 0, got {self.step_timeout_s}")


@dataclass
class FaultsConfig:
    max_restarts: int = option(3, "Replacements of dead rollout, reward or reference workers allowed per role within window_s; past it the job stops naming the role (0: any worker death stops the job).")
    window_s: float = option(3600.0, "The sliding window of the restart budget, in seconds.")
    hang_timeout_s: float | None = option(None, "A rollout, reward or reference call running longer than this counts its worker as hung: it is killed and replaced like a dead one (null: ray.call_timeout_s, past which a hung worker stops the job).")

    def validate(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"faults.max_restarts: expected >= 0, got {self.max_restarts}")
        if self.window_s <= 0:
            raise ConfigError(f"faults.window_s: expected > 0, got {self.window_s}")
        if self.hang_timeout_s is not None and self.hang_timeout_s <= 0:
            raise ConfigError(f"faults.hang_timeout_s: expected > 0 or null, got {self.hang_timeout_s}")


@dataclass
class ReferenceConfig:
    model: str | None = option(None, "Frozen reference model (null: the starting policy).")
    dtype: Dtype | None = option(None, "Reference dtype (null: model.dtype).")
    num_replicas: int = option(1, "ReferenceServer replicas (requests go round-robin).")
    cpus_per_replica: float = option(0.0, "Ray CPUs reserved per ReferenceServer.")
    gpus_per_replica: float = option(0.0, "Ray GPUs per ReferenceServer; a fraction shares a GPU with another role. >0 runs it on the GPU.")
    resources: dict[str, float] = option({}, "Custom Ray resources per ReferenceServer.")
    micro_batch_size: int = option(8, "Episodes per reference forward pass.")
    shared_prompt: bool = option(True, "Compute a prompt once for the episodes that share it (a prompt's n samples): one row, the prompt then each response, each attending to the prompt and to itself only. Same log-probs, fewer tokens.")
    threads: int | None = option(None, "Torch CPU threads per ReferenceServer (CPU only). null: cpus_per_replica when at least 1, else the cores of its node (its forwards run while the rollouts wait for them).")

    def validate(self) -> None:
        check_placement("reference", "num_replicas", self.num_replicas, "cpus_per_replica", self.cpus_per_replica,
                        "gpus_per_replica", self.gpus_per_replica, self.resources)
        if self.micro_batch_size < 1:
            raise ConfigError(f"reference.micro_batch_size: expected at least 1, got {self.micro_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"reference.threads: expected at least 1 or null, got {self.threads}")


@dataclass
class WeightSyncConfig:
    transport: Literal["auto", "shared_memory", "object_store", "broadcast"] = option("auto", "Learner -> rollout weights: auto is broadcast (NCCL) when learners and rollouts are on GPUs; else shared memory while every rollout worker is on learner rank 0's node, the object store when one is not.")
    bucket_mb: int = option(256, "Broadcast bucket size in MiB (tensors are sent in buckets of about this size).")

    def validate(self) -> None:
        if self.bucket_mb < 1:
            raise ConfigError(f"weight_sync.bucket_mb: expected at least 1, got {self.bucket_mb}")


@dataclass
class CheckpointConfig:
    save_every: int = option(0, "Save a checkpoint every N steps (0: only at the end).")
    keep_last: int = option(2, "Checkpoints to keep.")


# --------------------------------------------------------------------------- recipes


@dataclass
class RunConfig:
    """Fields every recipe shares: where the run lives, how it resumes, Ray and logging."""

    run_dir: str = option("runs/latest", "Run folder: config, checkpoints, summary.json, W&B files.")
    resume: Literal["never", "auto"] = option("never", "'auto' continues from the last checkpoint in run_dir.")
    seed: int = option(0, "Global seed.")
    ray: RayConfig = section(RayConfig, "Ray cluster connection.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")


@dataclass
class GenerateConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy to sample from.")
    data: DataConfig = section(DataConfig, "Prompts.")
    sampling: SamplingConfig = section(SamplingConfig, "Sampling settings.")
    rollout: RolloutConfig = section(RolloutConfig, "Rollout workers.")
    reward: RewardConfig = section(RewardConfig, "Optional scoring of the samples (null model, function and url: none).")
    split: Literal["train", "heldout", "all"] = option("heldout", "Which split of the data to prompt with.")


@dataclass
class SFTConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The model to fine-tune.")
    data: DataConfig = section(DataConfig, "Instruction data.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    learner: LearnerConfig = section(LearnerConfig, "DeepSpeed learners.")
    epochs: int = option(1, "Passes over the training set.")
    batch_size: int = option(16, "Global batch size in sequences.")
    max_steps: int | None = option(None, "Stop after N optimizer steps (null: run all epochs).")
    loss_aggregation: Literal["token_mean", "seq_mean"] = option("token_mean", "How token losses are averaged.")
    eval_every: int = option(0, "Held-out evaluation every N steps (0: only first and last).")
    max_eval_rows: int | None = option(None, "Evaluate on at most the first N held-out rows (null: all).")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "max_steps", "max_eval_rows"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: expected at least 1, got {value}")
        for key in ("eval_every", "checkpoint.save_every"):
            value = self.eval_every if key == "eval_every" else self.checkpoint.save_every
            if value < 0:
                raise ConfigError(f"{key}: expected 0 or more, got {value}")
        if self.checkpoint.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: expected at least 1, got {self.checkpoint.keep_last}")
        if self.batch_size < self.learner.num_workers:
            raise ConfigError(f"batch_size: {self.batch_size} cannot feed learner.num_workers="
                              f"{self.learner.num_workers} ranks (every rank needs at least one "
                              "row of each batch)")


@dataclass
class RMConfig(SFTConfig):
    data: DataConfig = option(DataConfig(format="preference"), "Preference pairs (prompt, chosen, rejected).")
    margin: float = option(0.0, "Margin in the pairwise loss -log sigmoid(r_c - r_r - margin).")
    stats_rows: int | None = option(None, "Training pairs scored after training for reward_mean/std (null: all).")

    def validate(self) -> None:
        super().validate()
        if self.stats_rows is not None and self.stats_rows < 1:
            raise ConfigError(f"stats_rows: expected at least 1 or null, got {self.stats_rows}")


@dataclass
class DPOConfig(SFTConfig):
    data: DataConfig = option(DataConfig(format="preference"), "Preference pairs (prompt, chosen, rejected).")
    beta: float = option(0.1, "DPO beta: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo"] = option("sigmoid", "DPO (sigmoid) or IPO loss.")
    label_smoothing: float = option(0.0, "Conservative DPO label smoothing (0: plain DPO).")
    reference: ModelConfig = section(ModelConfig, "The frozen reference (usually the SFT model).")
    reference_is_policy: bool = option(True, "Use the starting policy (model.path, model.dtype) as the reference; false: use reference.*.")
    reference_cpus: float = option(0.0, "Ray CPUs reserved for the ReferenceServer.")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta: expected a positive number, got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ConfigError(f"label_smoothing: expected 0 <= x <= 0.5, got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing: conservative DPO needs loss_type=sigmoid "
                              "(IPO has no label smoothing)")


@dataclass
class DoctorConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The tiny model used for the round trip.")


@dataclass
class ServeRMConfig:
    """`rlhf-ray serve-rm`: a reward model and/or reward function over HTTP (no Ray)."""

    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "What the endpoint scores with (a model, a function, or both; not a url).")
    dtype: Dtype = option("float32", "Reward model dtype.")
    host: str = option("127.0.0.1", "Address to bind. Any address but loopback needs a bearer token in token_env.")
    port: int = option(8000, "Port to bind (0: any free port, printed at start).")
    token_env: str = option("RLHF_RAY_REWARD_TOKEN", "Environment variable holding the bearer token clients must send (unset: no auth, loopback only).")
    max_body_kb: int = option(4096, "Largest request body accepted, in KiB (larger: 413).")
    max_episodes: int = option(1024, "Most episodes in one request (more: 413).")
    batch_wait_ms: float = option(5.0, "How long a request waits for others to join its scoring batch.")

    def validate(self) -> None:
        if self.reward.url:
            raise ConfigError("reward.url: serve-rm scores with a local model or function; "
                              "it does not forward to another endpoint")
        if not (self.reward.model or self.reward.function):
            raise ConfigError("reward: set reward.model, reward.function, or both")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {self.port}")
        if self.max_body_kb < 1 or self.max_episodes < 1 or self.batch_wait_ms < 0:
            raise ConfigError("max_body_kb and max_episodes must be at least 1, batch_wait_ms >= 0")


# --------------------------------------------------------------------------- online recipes


@dataclass
class KLConfig:
    coef: float = option(0.05, "KL penalty coefficient beta (initial value when adaptive).")
    mode: Literal["reward", "loss"] = option("reward", "Apply KL shaped into the token rewards, or as a loss term.")
    reward_estimator: Literal["k1", "k2", "k3"] = option("k1", "KL estimate in the reward (mode=reward) and in the kl/mean metric; k1 is unbiased.")
    loss_estimator: Literal["k1", "k2", "k3"] = option("k3", "KL loss term (mode=loss): k3 follows the gradient of KL(ref||policy), k2 of KL(policy||ref); k1 is refused (zero expected gradient).")
    adaptive: bool = option(False, "Adapt beta toward target (Ziegler et al. controller).")
    target: float = option(6.0, "Target KL per episode for the adaptive controller.")
    horizon: int = option(10000, "Adaptive controller horizon in episodes.")

    def validate(self) -> None:
        if self.loss_estimator == "k1":
            raise ConfigError("kl.loss_estimator: k1 has zero expected gradient as a loss "
                              "(E_pi[grad log pi] = 0), so the penalty would do nothing; use k3 "
                              "(gradient of KL(ref||policy)) or k2 (gradient of KL(policy||ref))")


@dataclass
class GRPOConfig:
    normalize_std: bool = option(True, "Divide group-centred scores by the group's std (false: Dr. GRPO).")


@dataclass
class PPOConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy to train (usually the SFT model).")
    reference: ReferenceConfig = section(ReferenceConfig, "The frozen reference: model, dtype and placement.")
    weight_sync: WeightSyncConfig = section(WeightSyncConfig, "How new weights reach the rollout workers.")
    value_model: str | None = option(None, "Value model init for gae (null: the policy's backbone).")
    data: DataConfig = option(DataConfig(format="prompt", template="chat"), "Prompts (format: prompt).")
    sampling: SamplingConfig = option(SamplingConfig(n=4), "Sampling; sampling.n is the group size.")
    rollout: RolloutConfig = section(RolloutConfig, "vLLM rollout workers.")
    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "Episode rewards.")
    env: EnvConfig = section(EnvConfig, "Multi-turn episodes: an environment answers each policy turn and gives the rewards (reward is then unused).")
    learner: LearnerConfig = section(LearnerConfig, "DeepSpeed learners.")
    optim: OptimConfig = section(OptimConfig, "Policy optimizer.")
    value_lr: float = option(1e-5, "Value-model learning rate (gae only).")
    value_warmup_steps: int = option(0, "First N steps train only the value model (gae only); the policy waits for a useful critic.")
    advantage: Literal["gae", "grpo", "rloo", "reinforce++", "reinforce++-baseline"] = option("grpo", "Advantage estimator; gae trains a value model; reinforce++-baseline subtracts the group mean, then whitens over the batch.")
    grpo: GRPOConfig = section(GRPOConfig, "GRPO's group normalisation.")
    policy_loss: Literal["ppo", "gspo"] = option("ppo", "Token-level PPO ratios, or GSPO's one length-normalised ratio per sequence (set clip_eps ~3e-4).")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = option("token_mean", "How token losses become the batch loss; seq_mean_token_sum_norm divides each sequence's sum by sampling.max_new_tokens (Dr. GRPO).")
    entropy_coef: float = option(0.0, "Entropy bonus weight (0: entropy only reported).")
    dynamic_sampling: bool = option(False, "DAPO: drop prompt groups whose samples all scored the same, refilled from extra prompts.")
    dynamic_sampling_rounds: int = option(2, "Extra generation rounds a step may use to refill dropped groups.")
    overlong: Literal["none", "mask", "soft_penalty"] = option("none", "Truncated responses: kept as is, left out of the loss (mask), or penalised over the last overlong_buffer tokens (DAPO).")
    overlong_buffer: int = option(0, "soft_penalty: tokens before max_new_tokens where the penalty ramps from 0 to -overlong_penalty.")
    overlong_penalty: float = option(1.0, "soft_penalty: the penalty at max_new_tokens.")
    steps: int = option(10, "Policy versions to train (one rollout batch each).")
    prompts_per_step: int = option(8, "Prompts per rollout batch (episodes = prompts * sampling.n).")
    ppo_epochs: int = option(1, "Passes over each rollout batch.")
    mini_batches: int = option(1, "Optimizer steps per pass (the batch is split into this many).")
    clip_eps: float = option(0.2, "PPO ratio clip.")
    clip_eps_high: float | None = option(None, "Upper ratio clip (null: clip_eps).")
    dual_clip: float | None = option(None, "Dual-clip constant c > 1 for negative advantages (null: off).")
    value_clip_eps: float | None = option(0.2, "Value clip around the old values (null: off).")
    gamma: float = option(1.0, "Discount.")
    lam: float = option(0.95, "GAE lambda.")
    kl: KLConfig = section(KLConfig, "KL penalty against the frozen reference.")
    max_staleness: int = option(0, "Policy versions generation may run ahead of training (0: on-policy).")
    pi_old: Literal["auto", "recompute"] = option("auto", "Where PPO's pi_old log-probs come from. auto: the update's own forward when that is the same thing (one optimizer step per batch, critic-free advantages, kl.mode loss; any max_staleness), else a separate pass; recompute: always a separate learner forward before the update.")
    rollout_correction: Literal["none", "tis", "mask"] = option("tis", "Correct for pi_old != pi_rollout (engine mismatch, staleness): truncated per-token IS weights (tis), a sequence mask (mask), or none.")
    rollout_correction_cap: float = option(2.0, "tis: the cap C of min(pi_old/pi_rollout, C); mask: keep a sequence if its mean ratio is within [1/C, C].")
    chunk_size: int = option(4, "Prompts per generate call; finished chunks are scored while others generate.")
    eval_every: int = option(0, "Held-out evaluation every N steps (0: only first and last).")
    eval_prompts: int = option(32, "Held-out prompts per evaluation (greedy).")
    eval_samples: int = option(0, "Samples per held-out prompt for eval/score_sampled (0: sampling.n).")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    faults: FaultsConfig = section(FaultsConfig, "Replacing dead rollout, reward and reference workers.")

    def validate(self) -> None:
        if (self.advantage in ("grpo", "rloo", "reinforce++-baseline") or self.dynamic_sampling) \
                and self.sampling.n < 2:
            raise ConfigError(f"advantage={self.advantage} needs sampling.n >= 2 (a group per prompt), "
                              f"got {self.sampling.n}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness: expected >= 0, got {self.max_staleness}")
        if self.policy_loss == "gspo" and self.clip_eps > 0.01:
            raise ConfigError(f"clip_eps={self.clip_eps} with policy_loss=gspo: sequence ratios stay within "
                              "~1e-3 of 1, so this never clips; use clip_eps=3e-4 clip_eps_high=4e-4")
        if self.dynamic_sampling and self.advantage == "gae":
            raise ConfigError("dynamic_sampling: groups are for grpo, rloo and reinforce++(-baseline), "
                              "not gae")
        if self.dynamic_sampling_rounds < 0 or self.overlong_buffer < 0:
            raise ConfigError("dynamic_sampling_rounds and overlong_buffer: expected >= 0")
        if self.overlong == "soft_penalty" and not 0 < self.overlong_buffer <= self.sampling.max_new_tokens:
            raise ConfigError(f"overlong_buffer: soft_penalty needs 0 < overlong_buffer <= "
                              f"sampling.max_new_tokens={self.sampling.max_new_tokens}, got {self.overlong_buffer}")
        if self.rollout_correction_cap <= 1.0:
            raise ConfigError(f"rollout_correction_cap: expected > 1, got {self.rollout_correction_cap}")
        if self.sampling.temperature <= 0:
            raise ConfigError(f"sampling.temperature: training samples need a temperature > 0 "
                              f"(0 is greedy, which has no log-probs to train on), got {self.sampling.temperature}")
        if self.sampling.top_p < 1.0 or self.sampling.top_k > 0:
            raise ConfigError(f"sampling.top_p={self.sampling.top_p}, sampling.top_k={self.sampling.top_k}: "
                              "training samples must come from the full distribution (top_p=1, "
                              "top_k=-1); the learner's log-probs do not renormalise over a "
                              "truncated vocabulary")
        if self.prompts_per_step < 1 or self.steps < 1 or self.chunk_size < 1:
            raise ConfigError("steps, prompts_per_step and chunk_size must be at least 1")
        if not self.reward.is_set:
            raise ConfigError("reward: set reward.model, reward.function, reward.url, or a combination")
        if self.value_warmup_steps and self.advantage != "gae":
            raise ConfigError(f"value_warmup_steps: only advantage=gae has a value model, "
                              f"got advantage={self.advantage}")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples: expected >= 0 (0: sampling.n), got {self.eval_samples}")
        if not 0 <= self.value_warmup_steps < self.steps:
            raise ConfigError(f"value_warmup_steps: expected 0 <= value_warmup_steps < steps={self.steps}, "
                              f"got {self.value_warmup_steps}")


@dataclass
class RSConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy to improve (usually the SFT model).")
    data: DataConfig = option(DataConfig(format="prompt", template="chat"), "Prompts (format: prompt).")
    sampling: SamplingConfig = option(SamplingConfig(n=4), "Sampling; sampling.n responses per prompt.")
    rollout: RolloutConfig = section(RolloutConfig, "vLLM rollout workers.")
    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "Scores the n samples.")
    learner: LearnerConfig = section(LearnerConfig, "DeepSpeed learners (SFT on the kept set).")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    rounds: int = option(2, "Rounds of sample -> keep best -> fine-tune -> sync.")
    prompts_per_round: int = option(32, "Prompts sampled each round.")
    threshold: float | None = option(None, "Keep a prompt's best response only if it scores at least this (null: always).")
    epochs: int = option(1, "SFT passes over each round's kept set.")
    batch_size: int = option(16, "Sequences per optimizer step.")
    eval_prompts: int = option(32, "Held-out prompts per evaluation (greedy).")
    eval_samples: int = option(0, "Samples per held-out prompt for eval/score_sampled (0: sampling.n).")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints (save_every counts rounds).")

    def validate(self) -> None:
        if self.sampling.n < 2:
            raise ConfigError(f"sampling.n: rejection sampling needs at least 2 samples per prompt, got {self.sampling.n}")
        if self.rounds < 1 or self.prompts_per_round < 1 or self.batch_size < 1:
            raise ConfigError("rounds, prompts_per_round and batch_size must be at least 1")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples: expected >= 0 (0: sampling.n), got {self.eval_samples}")


@dataclass
class PrefsConfig(RunConfig):
    model: ModelConfig = section(ModelConfig, "The policy that writes the candidate responses.")
    data: DataConfig = option(DataConfig(format="prompt", template="chat"), "Prompts, or preference rows for judge=labels.")
    sampling: SamplingConfig = option(SamplingConfig(n=4), "sampling.n candidates per prompt.")
    rollout: RolloutConfig = section(RolloutConfig, "vLLM rollout workers.")
    judge: Literal["reward", "labels"] = option("reward", "reward: the RewardServer picks best/worst; labels: pairs already on disk.")
    reward: RewardConfig = option(RewardConfig(function="arithmetic"), "The judge (reward function and/or model).")
    split: Literal["train", "heldout", "all"] = option("train", "Which split of the prompts to use.")
    min_margin: float = option(0.0, "Skip a prompt unless best - worst score exceeds this (ties never make pairs).")

    def validate(self) -> None:
        if self.judge == "reward" and self.sampling.n < 2:
            raise ConfigError(f"sampling.n: a judge needs at least 2 candidates per prompt, got {self.sampling.n}")
        if self.judge == "labels" and self.data.format != "preference":
            raise ConfigError("judge=labels reads existing pairs: set data.format=preference")


STAGES = ("sft", "prefs", "rm", "rs", "ppo", "dpo")


@dataclass
class PipelineConfig(RunConfig):
    """SFT -> prefs -> RM -> RS -> PPO, with a DPO branch from the SFT model, on one Ray.

    The root's ``ray`` and ``logging`` sections apply to every stage."""

    model: ModelConfig = section(ModelConfig, "The pretrained model the pipeline starts from.")
    stages: list[str] = option(list(STAGES), "Stages to run, in pipeline order (a subset of sft prefs rm rs ppo dpo).")
    eval_data: DataConfig = option(DataConfig(format="prompt", template="alpaca"), "Held-out task prompts every stage's model is scored on.")
    eval_checker: str = option("arithmetic", "Exact-answer checker that scores the held-out task.")
    eval_prompts: int = option(64, "Held-out prompts in the final comparison.")
    eval_max_new_tokens: int = option(48, "Greedy tokens per held-out answer.")
    sft: SFTConfig = section(SFTConfig, "Stage 1: supervised fine-tuning (from model).")
    prefs: PrefsConfig = section(PrefsConfig, "Stage 2: preference pairs written by the SFT model.")
    rm: RMConfig = section(RMConfig, "Stage 3: reward model on the pairs (initialised from the SFT model).")
    rs: RSConfig = section(RSConfig, "Stage 4: rejection sampling from the SFT model, scored by the RM.")
    ppo: PPOConfig = section(PPOConfig, "Stage 5: PPO from the RS model, reference = SFT, reward = RM.")
    dpo: DPOConfig = section(DPOConfig, "Branch: DPO from the SFT model on the same pairs.")

    def validate(self) -> None:
        if self.resume == "auto":
            raise ConfigError("resume=auto: the pipeline keeps no checkpoints of its own, so it cannot "
                              "resume; rerun it with resume=never")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown}; choices: {', '.join(STAGES)}")
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            raise ConfigError(f"stages: must follow the pipeline order {', '.join(STAGES)}; got {self.stages}")
