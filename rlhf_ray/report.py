"""The pipeline's report: Markdown with the held-out score of every stage and plots."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf_ray.files import write_atomic


def stage_scores_plot(scores: dict[str, float], path: Path) -> Path:
    """Bar chart: held-out task score of each stage's model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(scores) + 2, 3.2))
    bars = ax.bar(list(scores), list(scores.values()), color="#4c78a8")
    for bar, value in zip(bars, scores.values()):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, max(1.0, max(scores.values()) * 1.15))
    ax.set_title("Held-out task score by stage")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric(summary: dict, key: str) -> str:
    m = summary.get("metrics", {}).get(key)
    return f"{m['first']:.4g} -> {m['final']:.4g}" if m else "-"


STAGE_KEYS = {
    "sft": ["eval/loss", "eval/perplexity", "train/loss", "sft/loss"],
    "prefs": ["prefs/pairs", "reward/mean", "prefs/margin_mean"],
    "rm": ["eval/accuracy", "rm/accuracy", "rm/loss"],
    "rs": ["reward/mean", "rs/best_mean", "eval/score"],
    "ppo": ["reward/mean", "kl/mean", "eval/score", "policy/clip_frac"],
    "dpo": ["eval/accuracy", "eval/margin", "dpo/accuracy", "dpo/margin"],
}


def write_report(path: Path, cfg, result: dict, summaries: dict[str, dict]) -> Path:
    """``report.md`` beside the run: scores by stage, each stage's key metrics, the plots."""
    run_dir = path.parent
    lines = [f"# rlhf-ray pipeline report: {cfg.model.path}", "",
             f"Wall time {result['wall_s']:.0f} s; peak memory of all processes {result['peak_rss_gib']} GiB.", "",
             f"## Held-out task score ({cfg.eval_checker} checker, {cfg.eval_prompts} prompts, greedy)", "",
             "| model | score |", "|---|---|"]
    lines += [f"| {name} | {score:.3f} |" for name, score in result["heldout_score"].items()]
    lines += ["", "![held-out score by stage](stage_scores.png)", "", "## Stages", "",
              "| stage | wall s | key metrics (first -> final) |", "|---|---|---|"]
    for name, summary in summaries.items():
        shown = [f"`{k}` {_metric(summary, k)}" for k in STAGE_KEYS.get(name, [])
                 if k in summary.get("metrics", {})]
        lines.append(f"| {name} | {summary.get('wall_s', 0):.0f} | {'; '.join(shown) or '-'} |")
    stage_peaks = result.get("stage_peak_rss_gib") or {}
    if stage_peaks:
        lines += ["", "## Memory", "", "Peak memory (PSS, all processes) while each stage ran, in GiB:", "",
                  "| " + " | ".join(stage_peaks) + " |", "|" + "---|" * len(stage_peaks),
                  "| " + " | ".join(f"{v:.2f}" for v in stage_peaks.values()) + " |", "",
                  "At the overall peak: " + ", ".join(f"`{k}` {v:.2f}" for k, v in
                                                      (result.get("peak_rss_by_process_gib") or {}).items()) + "."]
    for name in ("ppo", "rs"):
        plot = (summaries.get(name) or {}).get("outputs", {}).get("plot")
        if plot and Path(plot).is_file():
            shutil.copy(plot, run_dir / f"{name}.png")
            lines += ["", f"## {name.upper()}: reward and KL per step", "", f"![{name}]({name}.png)"]
    write_atomic(path, "\n".join(lines) + "\n")
    return path
