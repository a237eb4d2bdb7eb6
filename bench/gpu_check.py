"""GPU checks for one CUDA machine without vLLM (or Ray); prints one JSON object.

    bash bench/gpu_check.sh            # sets the environment, runs this, saves the JSON

Each check runs on its own, and a failure is recorded, not fatal:

- ``zero``: the project's DeepSpeed engine set-up (``ds_config``) at ZeRO-2 and ZeRO-3 in
  bf16 on CUDA: a few training steps of a SmolLM2-shaped model whose loss must fall;
- ``nccl_one_gpu``: the project's bucketed weight broadcast (``broadcast_send`` /
  ``broadcast_recv``) between two processes on the same GPU over NCCL (NCCL may refuse two
  ranks on one device; the error is then the result);
- ``servers_on_gpu``: the reference log-probs (``response_logprobs``) and the reward
  scorer (``RewardScorer``) on CUDA, against the same computation on CPU;
- ``mfu``: tokens/s and model FLOPs utilisation of a ZeRO-2 bf16 learner step
  (6 x parameters x tokens per step over the GPU's dense bf16 peak).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def smol_config(layers: int = 30):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=2048, tie_word_embeddings=True)


def engine(stage: int, micro_batch: int):
    import deepspeed
    from transformers import AutoModelForCausalLM

    from rlhf_ray.config import LearnerConfig, OptimConfig
    from rlhf_ray.workers.deepspeed_setup import build_optimizer, ds_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smol_config()).to(torch.bfloat16)
    optim = OptimConfig(lr=1e-4)
    config = ds_config(LearnerConfig(zero_stage=stage, micro_batch_size=micro_batch), optim, "bfloat16")
    eng, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, optim), config=config)
    return eng, sum(p.numel() for p in model.parameters())


def train_steps(eng, steps: int, batch: int, seq: int) -> tuple[list[float], float]:
    torch.manual_seed(1)
    ids = torch.randint(0, 49152, (batch, seq), device=eng.device)
    losses, start = [], 0.0
    for i in range(steps):
        if i == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = eng(input_ids=ids, labels=ids).loss
        eng.backward(loss)
        eng.step()
        losses.append(float(loss))
    torch.cuda.synchronize()
    return losses, (time.perf_counter() - start) / max(steps - 1, 1)


def check_zero() -> dict:
    out = {}
    for stage in (2, 3):
        t0 = time.perf_counter()
        eng, _ = engine(stage, 8)
        losses, _ = train_steps(eng, 6, 8, 256)
        out[f"zero{stage}"] = {"loss_first": losses[0], "loss_last": losses[-1],
                               "falls": losses[-1] < losses[0], "seconds": time.perf_counter() - t0}
        del eng
        torch.cuda.empty_cache()
    return out


def check_mfu() -> dict:
    eng, params = engine(2, 16)
    batch, seq = 16, 1024
    _, step_s = train_steps(eng, 6, batch, seq)
    tokens_s = batch * seq / step_s
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = 6 * params * tokens_s
    return {"device": name, "params": params, "tokens_per_s": tokens_s, "step_s": step_s,
            "tflops": flops / 1e12, "mfu": flops / (peak * 1e12) if peak else None}


def _nccl_rank(rank: int, port: int, results) -> None:
    from rlhf_ray.workers.weight_sync import (
        broadcast_recv,
        broadcast_send,
        open_group,
        tensor_metadata,
    )

    try:
        torch.cuda.set_device(0)
        torch.manual_seed(0)
        state = {"w": torch.randn(4096, 576), "b": torch.randn(576).to(torch.bfloat16)}
        group, _store = open_group("127.0.0.1", port, rank, 2, "nccl")
        start = time.perf_counter()
        if rank == 0:
            broadcast_send(group, state, bucket_bytes=4 << 20, device="cuda")
        else:
            got = dict(broadcast_recv(group, tensor_metadata(state), bucket_bytes=4 << 20, device="cuda"))
            results.put({"exact": all(torch.equal(got[k].cpu(), v) for k, v in state.items()),
                         "seconds": time.perf_counter() - start})
    except Exception as e:
        results.put({"error": f"rank {rank}: {type(e).__name__}: {e}"[:500]})


def check_nccl_one_gpu() -> dict:
    import torch.multiprocessing as mp

    from rlhf_ray.workers.group import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    got = []
    while not results.empty():
        got.append(results.get())
    for p in procs:
        if p.is_alive():
            p.kill()
    return {"results": got, "exitcodes": [p.exitcode for p in procs]}


def check_servers_on_gpu() -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.batch import Episode
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.workers.reference import response_logprobs
    from rlhf_ray.workers.reward import RewardScorer, ScoreItem

    torch.manual_seed(0)
    folder = Path("/tmp/gpu_check_models")
    causal = AutoModelForCausalLM.from_config(smol_config(layers=4))
    causal.save_pretrained(folder / "causal")
    rm = AutoModelForSequenceClassification.from_config(smol_config(layers=4), num_labels=1)
    rm.config.pad_token_id = 0
    rm.save_pretrained(folder / "rm")
    tokenizer_dir = os.environ.get("GPU_CHECK_TOKENIZER")
    episodes = [Episode(prompt_ids=[1, 5, 9, 13], response_ids=[7, 8, 9, 10, 11][: 2 + i], prompt_text="p",
                        response_text="r", logprobs=[0.0] * (2 + i), finish_reason="stop", policy_version=0)
                for i in range(4)]
    ref = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(folder / "causal", dtype=torch.float32).eval().to(device)
        ref[device] = response_logprobs(model, episodes, 0, micro_batch_size=2)
    diff = max(abs(a - b) for x, y in zip(ref["cpu"], ref["cuda"]) for a, b in zip(x, y))
    out = {"reference_max_abs_diff": diff}
    if tokenizer_dir:  # the reward scorer tokenises text, so it needs a tokenizer folder
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder / "rm")
        items = [ScoreItem("What is 2 + 3?", f" It is {i}.", None) for i in range(6)]
        scores = {d: RewardScorer(RewardConfig(model=str(folder / "rm")), "float32", d).score(items)
                  for d in ("cpu", "cuda")}
        out["reward_max_abs_diff"] = max(abs(a - b) for a, b in zip(scores["cpu"], scores["cuda"]))
    else:
        out["reward"] = "skipped: set GPU_CHECK_TOKENIZER to a tokenizer folder"
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    for name, check in (("servers_on_gpu", check_servers_on_gpu), ("nccl_one_gpu", check_nccl_one_gpu),
                        ("zero", check_zero), ("mfu", check_mfu)):
        start = time.perf_counter()
        try:
            report[name] = check()
        except Exception as e:
            report[name] = {"error": f"{type(e).__name__}: {e}"[:800],
                            "where": traceback.format_exc().splitlines()[-3:]}
        report[name + "_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
