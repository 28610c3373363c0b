"""PNG figures from one real run: the CPU/GPU activity timeline (sync vs async) and tokens/s per variant.

Redraw from a finished run's folder (e.g. fetched from the GPU machine):
``python recipes/bench/figures.py RUN_DIR [FIGURE_DIR]`` (FIGURE_DIR defaults to RUN_DIR).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

HOST_ROWS = ["ab.schedule", "ab.prepare", "ab.launch", "ab.wait", "ab.process"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timeline(windows: list[dict[str, Any]], path: str) -> Optional[str]:
    """One panel per variant: a row per host phase (``ab.*`` ranges) and a GPU row (union of kernel intervals)."""
    windows = [w for w in windows if w]
    if not windows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(windows), 1, figsize=(12, 1.0 + 1.6 * len(windows)), squeeze=False)
    for ax, w in zip(axes[:, 0], windows):
        hosts = HOST_ROWS + sorted(set(w["host"]) - set(HOST_ROWS))
        rows = [("GPU kernels", w["gpu_kernels"], "tab:green"), ("GPU copies", w["gpu_copies"], "tab:olive")]
        rows += [(f"CPU {name[3:]}", w["host"].get(name, []), f"C{i}") for i, name in enumerate(hosts)]
        for y, (label, spans, color) in enumerate(rows):
            ax.broken_barh([(s, e - s) for s, e in spans], (y - 0.4, 0.8), facecolors=color)
        ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
        ax.set_xlim(0, w["window_ms"])
        ax.invert_yaxis()
        ax.set_title(f"{w['variant']}: GPU busy {w['gpu_busy_pct']:.0f}% in this {w['window_ms']:.0f} ms window", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms (steady state, profiled run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def throughput(results: list[dict[str, Any]], ceiling: Optional[float], title: str, path: str,
               key: str = "output_tok_s") -> Optional[str]:
    """Tokens/s per variant (``key``: output, or scored for a scoring workload), with the roofline ceiling as a line."""
    ok = [r for r in results if r.get(key)]
    if not ok:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(ok), 4))
    names = [r["variant"] for r in ok]
    values = [r[key] for r in ok]
    bars = ax.bar(names, values, color=["tab:gray" if not n.startswith("ours") else "tab:blue" for n in names])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    if ceiling and ceiling < 20 * max(values):  # otherwise the line would flatten every bar
        ax.axhline(ceiling, color="tab:red", linestyle="--", linewidth=1, label=f"roofline {ceiling:,.0f}")
        ax.legend(fontsize=8)
    elif ceiling:
        title += f" (roofline ceiling {ceiling:,.0f})"
    ax.set_ylabel(key.replace("_tok_s", "").replace("_", " ") + " tokens/s")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(out_dir: Path, summary: dict[str, Any], run_dir: Optional[Path] = None) -> list[str]:
    """The timeline of ``figures.timeline_variants`` (those that ran) and the throughput bars of one workload."""
    name = summary["workload"]["name"]
    results = summary["results"]
    ok = {r["variant"] for r in results if r.get("status") == "ok"}
    windows = []
    for variant in summary["config"]["figures"].get("timeline_variants") or []:
        path = (run_dir or out_dir) / "timelines" / f"{name}_{variant}.json"
        if variant in ok and path.exists():
            windows.append(json.loads(path.read_text()))
    scoring = summary["workload"].get("generator") == "score_pairs"
    limit = summary["roofline"]
    if scoring:  # scored tokens over the prefill-only limit
        scored = (summary.get("requests_drawn") or {}).get("continuation_tokens") or 0
        ceiling = scored / limit["total_s"] if limit["total_s"] else None
    else:
        ceiling = limit["output_tokens_per_s"]
    key = "scored_tok_s" if scoring else "output_tok_s"
    made = [
        timeline(windows, str(out_dir / f"timeline_{name}.png")),
        throughput(results, ceiling, f"{name}: {key[:-6]} tokens/s", str(out_dir / f"throughput_{name}.png"), key),
    ]
    return [p for p in made if p]


if __name__ == "__main__":
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    fig_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else run_dir
    fig_dir.mkdir(parents=True, exist_ok=True)
    for bench_json in sorted(run_dir.glob("bench_*.json")):
        print("\n".join(draw_all(fig_dir, json.loads(bench_json.read_text()), run_dir)))
