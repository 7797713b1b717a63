"""The paper-layout table of ``dymu eval`` runs: one row per method, a score per task, relative performance against
``full``, visual tokens (mean and spread), prefill FLOPs and latency, all computed from the per-sample records of the
result files (``OUT/METHOD/TASK/result.json``). Written as Markdown, CSV and JSON, with score-vs-tokens and
score-vs-FLOPs plots (PNG)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import DymuError
from ..files import atomic_write, atomic_write_json
from .runner import RESULT_FILE, RESULT_FORMAT
from .settings import FULL

TABLE_FORMAT = "dymu-eval-table"
TABLE_VERSION = 1
TABLE_FILES = ("table.md", "table.csv", "table.json", "score_vs_tokens.png", "score_vs_flops.png")


def load_results(folders) -> list[dict]:
    """The result files under each of ``folders`` (``METHOD/TASK/result.json``), in folder order; a (method, task)
    pair found twice keeps its first result."""
    results, seen = [], set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise DymuError(f"{folder}: no such folder (give the --out folders of dymu eval)")
        found = sorted(folder.glob(f"*/*/{RESULT_FILE}"))
        if not found:
            raise DymuError(f"{folder}: no results there (METHOD/TASK/{RESULT_FILE}; dymu eval --out writes them)")
        for path in found:
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                raise DymuError(f"{path}: not a JSON file") from None
            if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
                raise DymuError(f"{path}: not a dymu eval result file")
            if (result["method"], result["task"]) not in seen:
                seen.add((result["method"], result["task"]))
                results.append(result)
    return results


def table(results: list[dict], tasks: list[str] | None = None, methods: list[str] | None = None) -> dict:
    """{tasks, metrics, rows}: per method (``methods`` order first, then first-seen order) its score per task, ``relative`` (mean over tasks of
    score / full's score, None without a full row), visual tokens mean / std over every sample, FLOPs (mean per
    sample, and as a fraction of the same prompts unmerged) and latency (mean seconds per sample)."""
    tasks = list(dict.fromkeys([*(tasks or []), *(r["task"] for r in results)]))
    metrics = {r["task"]: r["main_metric"] for r in results}
    tasks = [task for task in tasks if task in metrics]
    methods = [m for m in dict.fromkeys([*(methods or []), *(r["method"] for r in results)])
               if any(r["method"] == m for r in results)]
    by_pair = {(r["method"], r["task"]): r for r in results}
    rows = []
    for method in methods:
        samples = [s for task in tasks if (method, task) in by_pair for s in by_pair[(method, task)]["samples"]]
        tokens = np.array([s["visual_tokens"] for s in samples], dtype=float)
        flops = float(np.mean([s["flops"] for s in samples]))
        stock = float(np.mean([s["stock_flops"] for s in samples]))
        scores = {task: by_pair[(method, task)]["metrics"][metrics[task]] for task in tasks if (method, task) in by_pair}
        rows.append({"method": method, "scores": scores, "samples": len(samples),
                     "visual_tokens": float(tokens.mean()), "visual_tokens_std": float(tokens.std()),
                     "flops": flops, "flops_fraction": flops / stock,
                     "latency": float(np.mean([s["seconds"] for s in samples]))})
    full = next((row for row in rows if row["method"] == FULL), None)
    for row in rows:
        row["relative"] = relative(row["scores"], full["scores"]) if full else None
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "tasks": tasks, "metrics": metrics, "rows": rows}


def relative(scores: dict, reference: dict) -> float | None:
    """Mean over the tasks both have of score / reference score (the papers' relative performance)."""
    ratios = [scores[t] / reference[t] for t in scores if t in reference and reference[t]]
    return float(np.mean(ratios)) if ratios else None


def _number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def cells(data: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text cells) of the table."""
    header = ["method", *(f"{t} ({data['metrics'][t]})" for t in data["tasks"]), "relative", "visual tokens",
              "prefill FLOPs", "latency (s/sample)"]
    rows = []
    for row in data["rows"]:
        rows.append([row["method"], *(_number(row["scores"].get(t)) for t in data["tasks"]),
                     "-" if row["relative"] is None else f"{100 * row['relative']:.1f}%",
                     f"{row['visual_tokens']:.1f} ± {row['visual_tokens_std']:.1f}",
                     f"{row['flops'] / 1e9:.3f} G ({100 * row['flops_fraction']:.1f}%)", f"{row['latency']:.3f}"])
    return header, rows


def markdown(data: dict) -> str:
    header, rows = cells(data)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def csv_text(data: dict) -> str:
    """One line per method: raw numbers (scores, relative, tokens mean/std, FLOPs, fraction, latency)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", *data["tasks"], "relative", "visual_tokens", "visual_tokens_std", "flops",
                     "flops_fraction", "latency_s", "samples"])
    for row in data["rows"]:
        writer.writerow([row["method"], *(row["scores"].get(t, "") for t in data["tasks"]),
                         "" if row["relative"] is None else row["relative"], row["visual_tokens"],
                         row["visual_tokens_std"], row["flops"], row["flops_fraction"], row["latency"], row["samples"]])
    return buffer.getvalue()


def plot(data: dict, path: Path, x: str) -> None:
    """Score per task against visual tokens (``x="visual_tokens"``) or FLOPs % (``"flops_fraction"``), one panel per
    task, a labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 4.0), dpi=110, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for row in data["rows"]:
            if task not in row["scores"]:
                continue
            value = row[x] * (100 if x == "flops_fraction" else 1)
            axis.plot(value, row["scores"][task], "*" if row["method"] == FULL else "o", ms=9)
            axis.annotate(row["method"], (value, row["scores"][task]), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
        axis.set_xlabel("visual tokens (mean)" if x == "visual_tokens" else "prefill FLOPs (% of unmerged)")
        axis.set_ylabel(data["metrics"][task])
        axis.set_title(task, fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


def write(data: dict, out) -> list[Path]:
    """table.md, table.csv, table.json and the two plots into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in TABLE_FILES]
    atomic_write(paths[0], markdown(data))
    atomic_write(paths[1], csv_text(data))
    atomic_write_json(paths[2], data)
    plot(data, paths[3], "visual_tokens")
    plot(data, paths[4], "flops_fraction")
    return paths
