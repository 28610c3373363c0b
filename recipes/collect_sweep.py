"""Collect a ``generate.py -m`` or ``evaluate.py -m`` sweep into one table (CSV + markdown) and plots.

    python recipes/collect_sweep.py multirun/generate/2026-01-01/12-00-00 [--out DIR]
    python recipes/collect_sweep.py multirun/evaluate/2026-01-01/12-00-00

Reads every ``summary.json`` under the directory (one per job; ``overrides`` names the swept values) and writes
``sweep.csv``, ``sweep.md`` and ``sweep.png`` (tokens/s against the knobs) into it (or ``--out``); evaluation sweeps
also get a column per task metric (with pass@k where ``sampling.n`` > 1) and ``sweep_metrics.png``, each metric
against each swept knob.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from typing import Any, Callable

METRICS = ["requests", "errors", "output_tokens", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s",
           "latency_p50_s", "wall_s", "preemptions"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_runs(root: str) -> list[dict[str, Any]]:
    """One dict per job: its overrides as ``key -> value`` plus its summary numbers, in job order."""
    runs = []
    for folder, _dirs, files in os.walk(root):
        if "summary.json" not in files:
            continue
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        knobs = dict(o.split("=", 1) for o in summary.get("overrides", []) if "=" in o)
        runs.append({"run": os.path.relpath(folder, root), "knobs": knobs, "summary": summary})
    return sorted(runs, key=lambda r: _natural(r["run"]))


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in text.replace(os.sep, "/").split("/")]


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Overrides whose value differs between jobs (the sweep's axes), in first-seen order."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r["knobs"] if k not in keys]
    return [k for k in keys if len({r["knobs"].get(k) for r in runs}) > 1]


def metric_names(runs: list[dict[str, Any]]) -> list[str]:
    """Task metrics of evaluation jobs (``summary["metrics"]``), in first-seen order."""
    names: list[str] = []
    for r in runs:
        names += [m for m in r["summary"].get("metrics", {}) if m not in names]
    return names


def table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    keys = swept_keys(runs)
    numbers = [m for m in METRICS if any(m in r["summary"] for r in runs)]
    scores = metric_names(runs)
    header = ["run", *keys, *numbers, *scores]
    rows = [[r["run"], *[r["knobs"].get(k, "") for k in keys], *[r["summary"].get(m) for m in numbers],
             *[r["summary"].get("metrics", {}).get(m) for m in scores]] for r in runs]
    return header, rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_markdown(path: str, header: list[str], rows: list[list[Any]]) -> None:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _number(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _series(ax, runs: list[dict[str, Any]], x_key: str, value: Callable[[dict], Any]) -> None:
    """One line per combination of the knobs other than ``x_key``; categorical x when the knob is not numeric."""
    keys = swept_keys(runs) or ["run"]
    values = {k: [r["knobs"].get(k, r["run"]) for r in runs] for k in keys}
    numeric = all(_number(v) is not None for v in values[x_key])
    series: dict[str, list[tuple[Any, float]]] = {}
    for i, r in enumerate(runs):
        y = value(r)
        if y is None:
            continue
        label = ", ".join(f"{k}={values[k][i]}" for k in keys if k != x_key) or "all"
        series.setdefault(label, []).append((values[x_key][i], float(y)))
    categories = list(dict.fromkeys(values[x_key]))
    for label, points in series.items():
        if numeric:
            points.sort(key=lambda p: _number(p[0]))
            xs = [_number(p[0]) for p in points]
        else:
            xs = [categories.index(p[0]) for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=label)
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    elif len({_number(v) for v in values[x_key]}) > 2 and min(_number(v) for v in values[x_key]) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)


def _x_key(runs: list[dict[str, Any]]) -> str:
    """The numeric knob with the most values, else the first knob."""
    keys = swept_keys(runs) or ["run"]
    values = {k: [r["knobs"].get(k, r["run"]) for r in runs] for k in keys}
    numeric = [k for k in keys if all(_number(v) is not None for v in values[k])]
    return max(numeric, key=lambda k: len(set(values[k]))) if numeric else keys[0]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(path: str, runs: list[dict[str, Any]]) -> None:
    """tokens/s against the numeric knob with the most values (x), one line per combination of the other knobs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _series(ax, runs, _x_key(runs), lambda r: r["summary"].get("output_tokens_per_s") or 0.0)
    ax.set_ylabel("output tokens/s")
    ax.set_title("sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metrics(path: str, runs: list[dict[str, Any]]) -> None:
    """A grid: each task metric (rows) against each swept knob (columns)."""
    plt = _pyplot()
    names, knobs = metric_names(runs), swept_keys(runs) or ["run"]
    fig, axes = plt.subplots(len(names), len(knobs), figsize=(5 * len(knobs), 3.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, knob in enumerate(knobs):
            _series(axes[i][j], runs, knob, lambda r, m=name: r["summary"].get("metrics", {}).get(m))
            axes[i][j].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect(root: str, out: str | None = None) -> dict[str, str]:
    """Write sweep.csv, sweep.md, sweep.png (and sweep_metrics.png for evaluation sweeps); returns their paths."""
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"no summary.json under {root}: is it the output directory of `generate.py -m` or "
                         "`evaluate.py -m`?")
    out = out or root
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"sweep.{ext}") for ext in ("csv", "md", "png")}
    header, rows = table(runs)
    with open(paths["csv"], "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    write_markdown(paths["md"], header, rows)
    plot(paths["png"], runs)
    if metric_names(runs):
        paths["metrics_png"] = os.path.join(out, "sweep_metrics.png")
        plot_metrics(paths["metrics_png"], runs)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the multirun directory of a `generate.py -m` or `evaluate.py -m` sweep")
    parser.add_argument("--out", default=None, help="where to write sweep.{csv,md,png} (default: root)")
    args = parser.parse_args()
    paths = collect(args.root, args.out)
    with open(paths["md"]) as f:
        print(f.read())
    print("\n".join(f"wrote {p}" for p in paths.values()))


if __name__ == "__main__":
    main()
