"""`rlhf-ray <command> ...`: the one entry point.

    rlhf-ray assets [--path NAME] [--verify]     build / locate the offline models
    rlhf-ray config RECIPE [CONFIG.yaml] [k=v]   print the resolved config as YAML
    rlhf-ray data inspect PATH --format F        statistics and validation of a data file
    rlhf-ray generate [CONFIG.yaml] [k=v]        sample from a model with rollout workers
    rlhf-ray doctor [--json]                     a self-check of every role on the tiny model
    rlhf-ray <recipe> [CONFIG.yaml] [k=v]        sft rm dpo prefs rs ppo pipeline generate
    rlhf-ray submit --address URL RECIPE ...     the same, as a job on a Ray cluster
    rlhf-ray scale --run NAME --rollout N        resize a running job's rollout workers
    rlhf-ray serve-rm [CONFIG.yaml] [k=v]        serve a reward model / function over HTTP
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhf_ray.config_loader import ConfigError, build_config, describe, to_yaml
from rlhf_ray.errors import UserError


def _recipes() -> dict[str, type]:
    from rlhf_ray.recipes import RECIPES

    return RECIPES


def cmd_assets(args: argparse.Namespace) -> int:
    from rlhf_ray import assets

    if args.path:
        if args.path not in assets.ASSET_NAMES:
            print(f"error: unknown asset '{args.path}'; known: {', '.join(assets.ASSET_NAMES)}",
                  file=sys.stderr)
            return 2
        if not assets.is_built(args.path):
            print(f"error: asset '{args.path}' is not built; run `rlhf-ray assets`", file=sys.stderr)
            return 1
        print(assets.asset_path(args.path))
        return 0
    fresh = not assets.is_built(assets.SMOLLM2)
    for name in assets.ASSET_NAMES:
        was_built = assets.is_built(name)
        path = assets.ensure(name)
        print(f"{name:24s} {'cached' if was_built else 'built '}  {path}")
    if fresh or args.verify:
        print("checking that transformers and vLLM load SmolLM2 and agree on greedy tokens ...")
        from rlhf_ray.workers.engine import greedy_check

        report = greedy_check(assets.SMOLLM2)
        print(f"ok: {len(report['vllm'])} greedy tokens agree: {report['text']!r}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from rlhf_ray.config import ServeRMConfig

    recipes = {**_recipes(), "serve-rm": ServeRMConfig}
    if args.recipe not in recipes:
        print(f"error: unknown recipe '{args.recipe}'; choices: {', '.join(recipes)}",
              file=sys.stderr)
        return 2
    cls = recipes[args.recipe]
    if args.doc:
        for key, tp, default, doc in describe(cls):
            print(f"{key:32s} {tp:28s} {default!r:16s} {doc}")
        return 0
    yaml_path, overrides = _split_config_args(args.items)
    cfg = build_config(cls, yaml_path, overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from rlhf_ray.data.inspect import inspect_main

    return inspect_main(args.path, args.format, args.tokenizer, args.max_length,
                        args.skip_invalid, args.template)


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]``: the first item is a file unless it has '='."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_recipe(args: argparse.Namespace) -> int:
    """Run a recipe: resolve its config, then call ``rlhf_ray.recipes.<name>.run(cfg)``."""
    import importlib

    yaml_path, overrides = _split_config_args(args.items)
    if getattr(args, "json", False):
        overrides = ["ray.log_to_driver=false", *overrides]  # stdout carries only the JSON
    cfg = build_config(_recipes()[args.command], yaml_path, overrides)
    module = importlib.import_module(f"rlhf_ray.recipes.{args.command}")
    if not getattr(args, "json", False):
        summary = module.run(cfg)
    else:  # everything the libraries print goes to stderr; stdout carries only the JSON
        sys.stdout.flush()
        real_stdout = os.dup(1)
        os.dup2(2, 1)
        try:
            summary = module.run(cfg)
        finally:
            sys.stdout.flush()
            os.dup2(real_stdout, 1)
            os.close(real_stdout)
        print(json.dumps(summary, indent=2, default=str))
    return 0 if summary.get("ok", True) else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from rlhf_ray import jobs
    from rlhf_ray.submit import build_runtime_env, entrypoint, load_runtime_env, submit

    if args.wait:
        print("note: --wait is the default now and will be removed", file=sys.stderr)
    if args.recipe not in _recipes():
        print(f"error: unknown recipe '{args.recipe}'; choices: {', '.join(_recipes())}", file=sys.stderr)
        return 2
    yaml_path, overrides = _split_config_args(args.items)
    build_config(_recipes()[args.recipe], yaml_path, overrides)  # fail here, not on the cluster
    user_env = load_runtime_env(args.runtime_env) if args.runtime_env else None
    runtime_env = build_runtime_env(user_env, args.working_dir,
                                    f"runtime env file {args.runtime_env}" if user_env else "--working-dir")
    address = args.address or jobs.default_address()
    client = jobs.connect(address)
    job_id = submit(client, address, entrypoint(args.recipe, args.items, args.python), runtime_env)
    if args.no_wait:
        print(job_id)
        print(f"submitted to {address}; `rlhf-ray jobs logs --follow {job_id}` follows it", file=sys.stderr)
        return 0
    return jobs.follow_command(client, address, job_id)


def cmd_jobs(args: argparse.Namespace) -> int:
    from rlhf_ray.jobs import jobs_main

    return jobs_main(args.jobs_command, args.address, getattr(args, "job_id", None),
                     getattr(args, "follow", False), getattr(args, "timeout", 30.0))


def cmd_scale(args: argparse.Namespace) -> int:
    import ray

    from rlhf_ray.driver.scaling import set_rollout_workers
    from rlhf_ray.runtime import check_address

    if args.rollout < 1:  # refused before touching any cluster
        print(f"error: scale --rollout {args.rollout}: expected at least 1 rollout worker "
              "(a running job always keeps one)", file=sys.stderr)
        return 2
    check_address(args.address, key="scale --address")
    try:
        ray.init(address=args.address, log_to_driver=False)
    except ConnectionError as e:
        raise UserError(f"scale --address {args.address}: {e}; expected the address of the "
                        "running job's cluster") from None
    try:
        n = set_rollout_workers(args.run, args.rollout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"run {args.run}: rollout workers -> {n} (applied between steps)")
    return 0


def cmd_serve_rm(args: argparse.Namespace) -> int:
    from rlhf_ray.config import ServeRMConfig
    from rlhf_ray.workers.reward_http import serve

    yaml_path, overrides = _split_config_args(args.items)
    serve(build_config(ServeRMConfig, yaml_path, overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description="Distributed RLHF on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("assets", help="build the offline model assets (idempotent)")
    p.add_argument("--path", metavar="NAME", help="print the folder of a built asset and exit")
    p.add_argument("--verify", action="store_true", help="rerun the transformers/vLLM greedy check")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("config", help="print a recipe's resolved config as YAML")
    p.add_argument("recipe", help="recipe name (or serve-rm)")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                   help="YAML overrides file, then dotted key=value overrides")
    p.add_argument("--doc", action="store_true", help="list every key with type, default and doc")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("inspect", help="row count, token lengths, duplicates, invalid rows")
    q.add_argument("path")
    q.add_argument("--format", required=True,
                   choices=["instruction", "conversation", "prompt", "preference"])
    q.add_argument("--tokenizer", default="tiny-llama", help="asset name or folder")
    q.add_argument("--max-length", type=int, default=1024)
    q.add_argument("--skip-invalid", action="store_true")
    q.add_argument("--template", choices=["alpaca", "chat"], default="alpaca")
    q.set_defaults(func=cmd_data)

    p = sub.add_parser("submit", help="run a recipe as a job on a Ray cluster; follows its logs")
    p.add_argument("--address", help="the cluster's dashboard (default: $RAY_ADDRESS, else "
                   "http://127.0.0.1:8265)")
    p.add_argument("--python", help="Python on the cluster nodes (default: this one)")
    p.add_argument("--working-dir", help="upload this folder as the job's working directory")
    p.add_argument("--runtime-env", metavar="FILE", help="YAML/JSON runtime env (working_dir, pip, "
                   "env_vars, ...); its env_vars win over the project's")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    wait.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)  # the default; deprecated
    p.add_argument("recipe")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop Ray jobs")
    p.add_argument("--address", help="the cluster's dashboard (default: $RAY_ADDRESS, else "
                   "http://127.0.0.1:8265)")
    jsub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    jsub.add_parser("list", help="every submitted job: id, status, start time, entrypoint")
    for action, text in (("status", "status and message; exit 1 if FAILED or STOPPED"),
                         ("logs", "the job's output"), ("stop", "stop a job and wait for it to end")):
        q = jsub.add_parser(action, help=text)
        q.add_argument("job_id", metavar="ID")
    q = jsub.choices["logs"]
    q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    q = jsub.choices["stop"]
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to end")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("scale", help="resize a running job's rollout workers")
    p.add_argument("--address", default="auto", help="the job's Ray cluster (GCS address or 'auto')")
    p.add_argument("--run", required=True, help="the run's name: the last part of its run_dir")
    p.add_argument("--rollout", type=int, required=True, help="wanted number of rollout workers")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("serve-rm", help="serve a reward model and/or function over HTTP",
                       description="Serve reward.model and/or reward.function at POST /score "
                                   "(the API is in rlhf_ray/workers/reward_http.py). Keys: "
                                   "`rlhf-ray config`-style, see ServeRMConfig.")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p.set_defaults(func=cmd_serve_rm)

    _add_recipes(sub)
    return parser


RECIPE_HELP = {
    "generate": "sample responses from a model with vLLM rollout workers",
    "doctor": "self-check: one generate/score/reference/train/sync round trip",
    "sft": "supervised fine-tuning", "rm": "reward-model training", "dpo": "DPO / IPO",
    "ppo": "online RL: PPO (gae) or GRPO / RLOO / REINFORCE++", "rs": "rejection sampling (best-of-n)",
    "prefs": "build preference pairs with a judge", "pipeline": "SFT -> prefs -> RM -> RS -> PPO, + DPO",
}


def _add_recipes(sub) -> None:
    """One sub-command per recipe: ``rlhf-ray <recipe> [CONFIG.yaml] [key=value ...]``."""
    for name, cls in _recipes().items():
        p = sub.add_parser(name, help=RECIPE_HELP.get(name, f"run the {name} recipe"),
                           description=(cls.__doc__ or "").strip() or None)
        p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value]")
        if name == "doctor":
            p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.set_defaults(func=cmd_recipe)


def main(argv: list[str] | None = None) -> int:
    import signal

    # SIGTERM (a job stop, a scheduler) unwinds like Ctrl-C: every recipe's `finally` shuts its
    # workers and its private Ray down, so no vLLM/DeepSpeed shm files or Ray daemons are left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # a bad file, model, worker or request: the message says which
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
