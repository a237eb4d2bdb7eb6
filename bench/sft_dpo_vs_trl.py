"""SFT, DPO and reward-model steps: rlhf-ray's learner against TRL's SFTTrainer, DPOTrainer
and RewardTrainer, same run.

    .venv/bin/python bench/sft_dpo_vs_trl.py                     # SmolLM2-135M fp32, 16 rows / 8 pairs a step
    .venv/bin/python bench/sft_dpo_vs_trl.py --steps 5 --only sft

Both sides train the same model on the same tokens in the same order: the SFT rows are
Alpaca-templated arithmetic (tokenised by rlhf-ray, handed to TRL pre-tokenised with
``labels`` on the response), the DPO pairs are the chat-templated sorting pairs (tokenised by
TRL, the same ids handed to rlhf-ray), the reward-model pairs are the sorting pairs as the
``rm`` recipe lays them out (Alpaca template, no EOS; handed to TRL as ``chosen_ids`` /
``rejected_ids``), both sides starting from one saved classifier with a seeded head. Same
batch (one micro-batch, no accumulation), AdamW, learning rate, gradient clipping at 1.0,
fp32, torch threads. DPO: sigmoid loss, beta 0.1, the frozen start model as the reference,
its log-probs computed every step on both sides (TRL: ``precompute_ref_log_probs=False``;
rlhf-ray: a ``ReferenceServer`` forward, then the learner's ``dpo_step``). Reward model:
the pairwise loss with no margin and no centring.

The learner is ``LearnerWorker`` exactly as the recipes build it (DeepSpeed ZeRO-0 on gloo,
one rank) and the reference is ``ReferenceServer``, both called in-process so that only
their own code is timed; TRL runs its trainers with a callback around each step. The first
step's loss (before any update) is compared: the same model on the same tokens must give
the same loss, within 1e-4. Steps/s is over the steps after the first.

The learner keeps freed memory in its heap for reuse (``reuse_freed_memory``, set when it
starts); TRL runs first, with glibc's defaults, as a user runs it. ``--trl-heap`` gives TRL
the same heap setting, so that the ratio shows what is left without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

LOSS_TOL = 1e-4


# --------------------------------------------------------------------------- data


def sft_examples(args, tokenizer):
    from rlhf_ray.config import DataConfig
    from rlhf_ray.data import sft_examples as load

    data = DataConfig(source="arithmetic", format="instruction", template="alpaca",
                      num_rows=args.batch * (args.steps + 1) * 2, max_length=128)
    examples, _, _ = load(data, tokenizer, "train")
    return examples[: args.batch * (args.steps + 1)]


def preference_texts(args, tokenizer) -> list[dict]:
    """Prompt, chosen and rejected text (chat template), for TRL to tokenise."""
    from rlhf_ray.config import DataConfig
    from rlhf_ray.data import preference_examples

    data = DataConfig(source="sorting", format="preference", template="chat",
                      num_rows=args.pairs * (args.steps + 1) * 2, max_length=128)
    examples, _, _ = preference_examples(data, tokenizer, "train")
    eos = tokenizer.eos_token_id

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t != eos])

    return [{"prompt": tokenizer.decode(e.prompt_ids), "chosen": text(e.chosen_ids),
             "rejected": text(e.rejected_ids)} for e in examples[: args.pairs * (args.steps + 1)]]


def reward_pairs(args, tokenizer) -> list:
    """The sorting pairs as the rm recipe lays them out: ``prompt_text + response`` in the
    Alpaca template, no special tokens, no EOS (so no real token is the pad id and TRL's
    last-non-pad pooling reads the same token rlhf-ray scores)."""
    from rlhf_ray.config import DataConfig
    from rlhf_ray.recipes.rm import reward_pairs as load

    data = DataConfig(source="sorting", format="preference", template="alpaca",
                      num_rows=args.pairs * (args.steps + 1) * 2, max_length=128)
    pairs, _, _ = load(data, tokenizer, "train")
    return pairs[: args.pairs * (args.steps + 1)]


def reward_start(model_path: str, folder: str) -> str:
    """One sequence classifier with a seeded fresh head, saved, so both sides start from the
    same weights (each loading the causal LM would draw its own head)."""
    import torch

    from rlhf_ray.models import load_model
    from rlhf_ray.workers.deepspeed_setup import copy_tokenizer

    torch.manual_seed(0)
    load_model(model_path, "reward").save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(model_path, folder)
    return folder


# --------------------------------------------------------------------------- TRL


class _Timer:
    def __init__(self):
        self.seconds, self._t = [], 0.0


def _trl_callback(timer: _Timer):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timer._t = time.perf_counter()

        def on_step_end(self, *_, **__):
            timer.seconds.append(time.perf_counter() - timer._t)

    return StepTimer()


def _in_order(trainer_cls):
    """The trainer with the rows in dataset order (the HF Trainer samples at random) and the
    unrounded loss of every step recorded (the logged loss is rounded to 4 decimals)."""
    import torch

    class InOrder(trainer_cls):
        losses: list[float] = []

        def _get_train_sampler(self, *_, **__):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *a, **kw):
            out = super().compute_loss(model, inputs, *a, **kw)
            loss = out[0] if isinstance(out, tuple) else out
            if model.training:
                self.losses.append(float(loss.detach()))
            return out

    return InOrder


def _trainer_args(args) -> dict:
    """The HF Trainer settings both TRL trainers share: the optimizer and schedule rlhf-ray's
    side uses, one optimizer step per batch, CPU, no saving or reporting."""
    return dict(gradient_accumulation_steps=1, learning_rate=args.lr, max_steps=args.steps + 1,
                max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, bf16=args.bf16, fp16=False, seed=0,
                dataloader_num_workers=0)


def trl_sft(args, model_path: str, examples) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": e.input_ids, "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}
            for e in examples]
    timer = _Timer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch, **_trainer_args(args),
                           shuffle_dataset=False, max_length=None, packing=False)
        trainer = _in_order(SFTTrainer)(
            model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), args=config,
            train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_path),
            callbacks=[_trl_callback(timer)])
        trainer.losses = []
        trainer.train()
    return {"step_s": timer.seconds, "losses": trainer.losses, "threads": torch.get_num_threads()}


def trl_dpo(args, model_path: str, texts: list[dict]) -> tuple[dict, list]:
    """TRL's DPOTrainer; also returns the (prompt, chosen, rejected) ids it trained on."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    timer = _Timer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, **_trainer_args(args),
                           beta=args.beta, loss_type=["sigmoid"], max_length=None,
                           precompute_ref_log_probs=False)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        trainer = _in_order(DPOTrainer)(
            model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), args=config,
            train_dataset=Dataset.from_list(texts), processing_class=tokenizer,
            callbacks=[_trl_callback(timer)])
        trainer.losses = []
        data = trainer.train_dataset
        triples = [(data[i]["prompt_ids"], data[i]["chosen_ids"], data[i]["rejected_ids"])
                   for i in range(len(data))]
        trainer.train()
    return {"step_s": timer.seconds, "losses": trainer.losses, "threads": torch.get_num_threads()}, triples


def trl_rm(args, model_path: str, pairs: list) -> dict:
    """TRL's RewardTrainer on the same token ids (pre-tokenised ``chosen_ids`` /
    ``rejected_ids``), no margin, no reward centring."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    timer = _Timer()
    rows = [{"chosen_ids": c, "rejected_ids": r} for c, r, _, _ in pairs]
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(output_dir=out, per_device_train_batch_size=args.pairs, **_trainer_args(args),
                              max_length=None, center_rewards_coefficient=None)
        trainer = _in_order(RewardTrainer)(
            model=AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32),
            args=config, train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[_trl_callback(timer)])
        trainer.losses = []
        trainer.train()
    return {"step_s": timer.seconds, "losses": trainer.losses, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- rlhf-ray


def _learner(args, model_path: str, micro_batch: int, model_kind: str = "causal_lm"):
    import torch

    from rlhf_ray.config import LearnerConfig, OptimConfig
    from rlhf_ray.workers.learner import LearnerWorker

    learner = LearnerWorker(model_path, LearnerConfig(micro_batch_size=micro_batch, threads=args.threads,
                                                      autocast="bfloat16" if args.bf16 else "none",
                                                      shared_prompt=not args.no_shared_prompt),
                            OptimConfig(lr=args.lr, grad_clip=1.0, weight_decay=0.0, betas=[0.9, 0.999], warmup_steps=0,
                                        schedule="constant"), model_kind=model_kind)
    learner.init()
    assert torch.get_num_threads() == args.threads
    return learner


def ours_sft(args, model_path: str, examples, pad: int) -> dict:
    from rlhf_ray.driver.batches import sequence_batch

    learner = _learner(args, model_path, args.batch)
    try:
        seconds, losses = [], []
        for step in range(args.steps + 1):
            batch = sequence_batch(examples[step * args.batch: (step + 1) * args.batch], pad)
            t0 = time.perf_counter()
            m = learner.sft_step(batch)
            seconds.append(time.perf_counter() - t0)
            losses.append(m["policy/loss"])
        return {"step_s": seconds, "losses": losses}
    finally:
        learner.shutdown()


def ours_dpo(args, model_path: str, triples: list, pad: int) -> dict:
    from rlhf_ray.driver.batches import preference_batch
    from rlhf_ray.workers.reference import ReferenceServer

    reference = ReferenceServer(model_path, "float32", micro_batch_size=2 * args.pairs,
                                autocast="bfloat16" if args.bf16 else "none")
    learner = _learner(args, model_path, 2 * args.pairs)  # a micro-batch is chosen + rejected rows
    try:
        seconds, losses = [], []
        for step in range(args.steps + 1):
            batch = preference_batch(triples[step * args.pairs: (step + 1) * args.pairs], pad)
            t0 = time.perf_counter()
            batch.ref_chosen_logps, batch.ref_rejected_logps = reference.preference_logps(batch)
            m = learner.dpo_step(batch, beta=args.beta)
            seconds.append(time.perf_counter() - t0)
            losses.append(m["dpo/loss"])
        return {"step_s": seconds, "losses": losses}
    finally:
        learner.shutdown()


def ours_rm(args, model_path: str, pairs: list, pad: int) -> dict:
    from rlhf_ray.recipes.rm import pair_batch

    learner = _learner(args, model_path, 2 * args.pairs, model_kind="reward")
    try:
        seconds, losses, shared = [], [], []
        for step in range(args.steps + 1):
            batch = pair_batch(pairs[step * args.pairs: (step + 1) * args.pairs], pad)
            shared.append(batch.shared_prompt(pad) is not None)
            t0 = time.perf_counter()
            m = learner.rm_step(batch)
            seconds.append(time.perf_counter() - t0)
            losses.append(m["rm/loss"])
        return {"step_s": seconds, "losses": losses, "shared_prompt_steps": sum(shared)}
    finally:
        learner.shutdown()


# --------------------------------------------------------------------------- report


def compare(name: str, trl: dict, ours: dict) -> dict:
    trl_s, ours_s = statistics.median(trl["step_s"][1:]), statistics.median(ours["step_s"][1:])
    loss_gap = abs(trl["losses"][0] - ours["losses"][0])
    # after one optimizer step with the same AdamW settings the losses should still agree
    second_gap = abs(trl["losses"][1] - ours["losses"][1]) if min(len(trl["losses"]), len(ours["losses"])) > 1 \
        else float("nan")
    result = {"trl": {**trl, "median_step_s": trl_s, "steps_per_s": 1 / trl_s},
              "rlhf_ray": {**ours, "median_step_s": ours_s, "steps_per_s": 1 / ours_s},
              "ratio": trl_s / ours_s, "first_loss_gap": loss_gap, "first_loss_equal": loss_gap <= LOSS_TOL,
              "second_loss_gap": second_gap}
    print(f"{name}: TRL {trl_s:6.2f} s/step, rlhf-ray {ours_s:6.2f} s/step -> {trl_s / ours_s:.2f}x; "
          f"first-step loss {trl['losses'][0]:.6f} vs {ours['losses'][0]:.6f} "
          f"(gap {loss_gap:.1e}, {'equal' if loss_gap <= LOSS_TOL else 'NOT equal'} within {LOSS_TOL:g}); "
          f"after one step: gap {second_gap:.1e}",
          flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first (untimed) one")
    ap.add_argument("--batch", type=int, default=16, help="SFT rows per step")
    ap.add_argument("--pairs", type=int, default=8, help="DPO and reward-model pairs per step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--bf16", action="store_true",
                    help="both sides under bf16 autocast (TRL bf16=True, rlhf-ray learner.autocast); "
                         "the first-step losses are then reported, not required to be equal")
    ap.add_argument("--trl-heap", action="store_true",
                    help="TRL runs with the heap setting the learner makes (freed memory kept for reuse)")
    ap.add_argument("--no-shared-prompt", action="store_true",
                    help="the learner runs chosen and rejected as two rows (learner.shared_prompt=false): "
                         "the lever measured on its own")
    ap.add_argument("--only", choices=["sft", "dpo", "rm"], default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sft_dpo_vs_trl.json"))
    args = ap.parse_args()

    if args.only is None:  # each in its own process: a learner's process group is set up once
        import subprocess

        results, argv = {}, [a for a in sys.argv[1:]]
        for kind in ("sft", "dpo", "rm"):
            out = Path(tempfile.mkdtemp()) / f"{kind}.json"
            done = subprocess.run([sys.executable, __file__, *argv, "--only", kind, "--out", str(out)])
            if out.exists():
                results.update(json.loads(out.read_text())["results"])
                out.unlink()
                out.parent.rmdir()
            if done.returncode not in (0, 1):
                raise SystemExit(f"bench/sft_dpo_vs_trl.py --only {kind} failed ({done.returncode})")
        return write(args, results)

    import torch

    from rlhf_ray.assets import resolve_model
    from rlhf_ray.data import load_tokenizer, pad_id

    torch.set_num_threads(args.threads)
    if args.trl_heap:
        from rlhf_ray.workers.group import reuse_freed_memory

        reuse_freed_memory()
    model_path = resolve_model(args.model, role="learner")
    tokenizer = load_tokenizer(model_path)
    pad = pad_id(tokenizer)
    results = {}
    if args.only in (None, "sft"):
        examples = sft_examples(args, tokenizer)
        results["sft"] = compare("SFT", trl_sft(args, model_path, examples),
                                 ours_sft(args, model_path, examples, pad))
    if args.only in (None, "dpo"):
        trl, triples = trl_dpo(args, model_path, preference_texts(args, tokenizer))
        results["dpo"] = compare("DPO", trl, ours_dpo(args, model_path, triples, pad))
    if args.only in (None, "rm"):
        pairs = reward_pairs(args, tokenizer)
        with tempfile.TemporaryDirectory() as folder:
            start = reward_start(model_path, folder)
            results["rm"] = compare("RM", trl_rm(args, start, pairs), ours_rm(args, start, pairs, pad))
    return write(args, results)


def write(args, results: dict) -> int:
    """Write the JSON report; exit status 1 when a first-step loss differs (fp32 only)."""
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": args.model, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["first_loss_equal"] for r in results.values()) or args.bf16 else 1


if __name__ == "__main__":
    sys.exit(main())
