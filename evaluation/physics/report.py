"""The physics report: ``physics_report.md`` and ``.json`` comparing video sources, and two plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cases import ACCEPTANCE_REQUIRED, PhysicsReport

logger = logging.getLogger(__name__)

PRIMARY = {
    "diffusion": "diffusion coefficient (px²/frame)",
    "mitosis": "late blob count",
    "blood_flow": "speed along direction (px/frame)",
    "chemotaxis": "drift toward source (px/frame)",
    "vesicle_transport": "speed along direction (px/frame)",
    "apoptosis": "late/early area ratio",
}
"""Primary measured quantity of each process (the ``measured``/``truth`` pair of its check)."""


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def _processes(reports: Sequence[PhysicsReport]) -> list[str]:
    """Processes in the order they first appear."""
    return list(dict.fromkeys(r.process for rep in reports for r in rep.results))


def _primary_metrics(rep: PhysicsReport, proc: str) -> list[dict]:
    """Metrics of ``rep``'s cases of ``proc`` that carry a measured primary quantity."""
    return [r.metrics for r in rep.results if r.process == proc and "measured" in r.metrics]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _accuracy_cell(rep: PhysicsReport, proc: str) -> str:
    """``passed/n (pct%)`` of ``rep``'s cases of ``proc`` (every case for ``overall``)."""
    rs = [r for r in rep.results if proc in ("overall", r.process)]
    if not rs:
        return "–"
    passed = sum(r.passed for r in rs)
    return f"{passed}/{len(rs)} ({100 * passed / len(rs):.0f}%)"


def _accuracy_section(reports: Sequence[PhysicsReport], procs: Sequence[str]) -> list[str]:
    rows = [[proc, *(_accuracy_cell(rep, proc) for rep in reports)] for proc in [*procs, "overall"]]
    intro = ["# Physics metrics", "", "Per-process accuracy against simulator ground truth.", ""]
    return intro + _table(["process", *(rep.label for rep in reports)], rows)


def _measurement_cell(rep: PhysicsReport, proc: str) -> str:
    ms = _primary_metrics(rep, proc)
    return f"{_median([m['measured'] for m in ms]):.3g} / {_median([m['truth'] for m in ms]):.3g}"


def _measurement_section(reports: Sequence[PhysicsReport], procs: Sequence[str]) -> list[str]:
    rows = [[proc, PRIMARY[proc], *(_measurement_cell(rep, proc) for rep in reports)] for proc in procs]
    intro = ["", "Median measured / median truth of each process's primary quantity.", ""]
    return intro + _table(["process", "quantity", *(rep.label for rep in reports)], rows)


def _acceptance_cell(check: dict) -> str:
    return f"{check['passed']}/{check['n']} (need {check['required']}) {'✓' if check['ok'] else '✗'}"


def _acceptance_section(reports: Sequence[PhysicsReport]) -> list[str]:
    """Issue 5's acceptance checks of the sources that ran them (nothing when none did)."""
    with_acc = [rep for rep in reports if rep.acceptance]
    if not with_acc:
        return []
    rows = [[name, *(_acceptance_cell(rep.acceptance[name]) for rep in with_acc)] for name in ACCEPTANCE_REQUIRED]
    intro = ["", "Issue 5 acceptance checks (seeds passed / required).", ""]
    return intro + _table(["check", *(rep.label for rep in with_acc)], rows)


def _error_section(reports: Sequence[PhysicsReport]) -> list[str]:
    errors = [(rep.label, r.id, r.error) for rep in reports for r in rep.results if r.error]
    return ["", f"{len(errors)} case(s) failed to generate or analyse; first: `{errors[0]}`"] if errors else []


def report_markdown(reports: Sequence[PhysicsReport]) -> str:
    """The Markdown report: accuracy, primary quantities, acceptance checks and failures per source."""
    procs = _processes(reports)
    lines = _accuracy_section(reports, procs) + _measurement_section(reports, procs)
    lines += _acceptance_section(reports) + _error_section(reports)
    return "\n".join(lines) + "\n"


def plot_accuracy(reports: Sequence[PhysicsReport], path: Path) -> None:
    """Grouped bars: accuracy per process, one bar per source."""
    from matplotlib.figure import Figure  # the eval extra; serving never plots

    procs = _processes(reports)
    fig = Figure(figsize=(1.2 + 1.3 * len(procs), 3.5))
    ax = fig.subplots()
    width = 0.8 / max(len(reports), 1)
    for k, rep in enumerate(reports):
        acc = rep.accuracy()
        ax.bar(np.arange(len(procs)) + k * width, [acc.get(p, 0) for p in procs], width, label=rep.label)
    ax.set_xticks(np.arange(len(procs)) + width * (len(reports) - 1) / 2, procs, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("physics accuracy")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _scatter_process(ax, reports: Sequence[PhysicsReport], proc: str) -> None:
    """Measured against truth of ``proc``'s primary quantity, one colour per source, with the diagonal."""
    for rep in reports:
        ms = _primary_metrics(rep, proc)
        ax.scatter([m["truth"] for m in ms], [m["measured"] for m in ms], s=14, label=rep.label, alpha=0.7)
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    ax.set_title(proc, fontsize=9)
    ax.set_xlabel("truth", fontsize=8)
    ax.set_ylabel(PRIMARY[proc], fontsize=7)


def plot_measurements(reports: Sequence[PhysicsReport], path: Path) -> None:
    """One scatter per process: measured against true primary quantity."""
    from matplotlib.figure import Figure

    procs = _processes(reports)
    cols = min(3, len(procs))
    rows = math.ceil(len(procs) / cols)
    fig = Figure(figsize=(3.3 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, proc in zip(axes, procs, strict=False):  # spare axes are switched off below
        _scatter_process(ax, reports, proc)
    for ax in axes[len(procs) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(reports: Sequence[PhysicsReport], out_dir: str | Path) -> dict[str, Path]:
    """Write ``physics_report.md``, ``physics_report.json``, ``accuracy.png`` and ``measurements.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "physics_report.md",
        "json": out / "physics_report.json",
        "accuracy_plot": out / "accuracy.png",
        "measurements_plot": out / "measurements.png",
    }
    paths["markdown"].write_text(report_markdown(reports))
    paths["json"].write_text(json.dumps({"sources": [rep.to_dict() for rep in reports]}, indent=1, default=float))
    plot_accuracy(reports, paths["accuracy_plot"])
    plot_measurements(reports, paths["measurements_plot"])
    return paths
