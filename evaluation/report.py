"""Reports of a run (JSON, Markdown, PNG bar charts) and side-by-side comparison of runs.

``report.json`` is the canonical record; the Markdown and the charts are rendered from it, so
``compare`` works from the JSON files of finished runs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .microworldbench import DIMENSION_TITLES, DIMENSIONS, LEVELS
from .runner import EvalResult, summary_of, usage_dict
from .scoring import Stat

logger = logging.getLogger(__name__)

PUBLISHED: dict[str, dict[str, float]] = {
    name: dict(zip(("average", *LEVELS, *DIMENSIONS), values, strict=True))
    for name, values in {
        "HunyuanVideo": (23.2, 23.1, 23.8, 19.4, 15.6, 48.2, 23.4),
        "CogVideoX-5B": (43.5, 39.9, 47.0, 38.6, 37.4, 64.1, 38.6),
        "Wan2.1-T2V-1.3B": (49.4, 45.9, 51.7, 52.4, 40.3, 71.8, 50.1),
        "Wan2.2-TI2V-5B": (51.6, 46.6, 53.9, 49.5, 40.7, 82.7, 47.0),
        "Wan2.1-T2V-14B": (54.8, 55.7, 54.4, 52.8, 42.7, 86.0, 53.8),
        "Wan2.2-T2V-A14B": (53.8, 56.3, 52.0, 53.3, 37.8, 92.8, 55.4),
        "MicroVerse-1.3B": (50.2, 47.6, 51.7, 53.3, 43.0, 68.5, 49.3),
        "Sora": (50.7, 55.9, 46.1, 55.0, 35.3, 96.4, 37.9),
        "Veo3": (77.2, 77.5, 76.9, 78.2, 65.7, 97.0, 77.0),
    }.items()
}
"""Published MicroWorldBench results (average; per level; per dimension), scored in the ``published`` reading."""

SCORING_FORMULAS: dict[str, str] = {
    "corrected": (
        "corrected reading (MWBenchRubrics_norm.json weights): one 0/1 score per criterion, else the dimension is "
        "missing; d11..d55 blocks read as d1..d5; dimension = max(0, R/M)·100 with M the sum of every positive "
        "weight of the block; task = pooled max(0, ΣR/ΣM)·100; averages = means over valid tasks (partial tasks "
        "excluded; of a duplicated task only the first entry counts)."
    ),
    "published": (
        "published reading (the upstream eval/calculate_scores.py, bit for bit; MWBenchRubrics_norm.json weights): "
        "answer k goes to the criterion numbered k (so d11..d55 blocks are read as empty), a score counts when it "
        "equals 1, M sums the positive weights of the answered criteria only; dimension = max(0, R/M·100), 0 when "
        "M = 0; task = pooled over the three dimensions; averages = sum/len over valid entries (a duplicated task "
        "counts once per entry)."
    ),
}
"""How each scoring reading computes the numbers (the report's footer)."""

REFERENCE_MODELS: tuple[str, ...] = ("Veo3", "Wan2.1-T2V-14B", "MicroVerse-1.3B", "Wan2.1-T2V-1.3B", "Sora")
"""Published models drawn as reference bars."""


def _stat(stat: Stat) -> dict[str, Any]:
    return asdict(stat)


def build_report(result: EvalResult, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The JSON-able report of a run."""
    summary = summary_of(result, n_resamples, seed)
    return {
        "model": result.model_name,
        "judge_model": result.judge_model,
        "scoring": result.scoring,
        "judge_protocol": result.judge_protocol,
        "benchmark_source": result.benchmark_source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "overall": _stat(summary.overall),
        "by_level": {lv: _stat(s) for lv, s in summary.by_level.items()},
        "by_dimension": {d: _stat(s) for d, s in summary.by_dimension.items()},
        "coverage": {
            "selected": summary.n_selected,
            "valid": summary.n_valid,
            "partial": {str(i): list(m) for i, m in summary.partial.items() if i not in result.missing_videos},
            "missing_videos": result.missing_videos,
            "anomalies": dict(Counter(a.kind for a in result.anomalies)),
        },
        "agreement": {d: asdict(a) for d, a in result.agreement.items()} if result.agreement else None,
        "cost": usage_dict(result),
        "tasks": [
            {
                "index": s.index,
                "level": s.level,
                "score": s.score,
                "dimensions": dict(s.dimensions),
                "missing": list(s.missing),
            }
            for s in result.scores
        ],
    }


def _fmt(stat: dict[str, Any], ci: bool = True) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:.1f}"
    if ci and stat["ci_low"] is not None:
        text += f" [{stat['ci_low']:.1f}, {stat['ci_high']:.1f}]"
    return text


def _listing(items: Sequence[str], shown: int = 20) -> str:
    if not items:
        return ""
    more = f", … ({len(items) - shown} more in report.json)" if len(items) > shown else ""
    return ": " + ", ".join(items[:shown]) + more


def _reading(report: dict[str, Any]) -> tuple[str, str]:
    """``(scoring, judge_protocol)`` of a report; reports written before these keys: corrected, ours."""
    return report.get("scoring", "corrected"), report.get("judge_protocol", "ours")


def _table(title: str, keys, headers: list[str], ours: dict, report: dict) -> list[str]:
    """One of the paper's tables: this run (with 95 % bootstrap CIs), then the published models.

    The published figures share the table only beside a ``published`` reading; otherwise they
    follow in a separate table marked as not like-for-like.
    """
    head = ["| Model | Average | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    lines = [
        "",
        f"## {title} (95 % bootstrap CI)",
        "",
        *head,
        f"| **{report['model']}** | {_fmt(report['overall'])} | " + " | ".join(_fmt(ours[k]) for k in keys) + " |",
    ]
    scoring, _ = _reading(report)
    if scoring != "published":
        lines += [
            "",
            f"### Published figures (upstream reading: not like-for-like with this {scoring} reading)",
            "",
            *head,
        ]
    lines += [
        f"| {m} (published) | {PUBLISHED[m]['average']:.1f} | "
        + " | ".join(f"{PUBLISHED[m][k]:.1f}" for k in keys)
        + " |"
        for m in REFERENCE_MODELS
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: the paper's two tables with 95 % CIs, coverage, agreement, cost."""
    cov = report["coverage"]
    scoring, protocol = _reading(report)
    lines = [
        f"# MicroWorldBench report: {report['model']}",
        "",
        f"Judge: `{report['judge_model']}` ({protocol} judge protocol); scoring: **{scoring}** reading; "
        f"benchmark: {report['benchmark_source']}; created {report['created']}.",
    ]
    lines += _table("Table 1: average and levels", LEVELS, list(LEVELS), report["by_level"], report)
    lines += _table("Table 2: average and dimensions", DIMENSIONS, [DIMENSION_TITLES[d] for d in DIMENSIONS],
                    report["by_dimension"], report)
    lines += [
        "",
        "## Coverage",
        "",
        f"- Valid tasks: {cov['valid']} / {cov['selected']} selected "
        f"(tasks per level: " + ", ".join(f"{lv} {report['by_level'][lv]['n']}" for lv in LEVELS) + ")",
        f"- Partial tasks (a dimension without a valid judgement; excluded from every average): {len(cov['partial'])}"
        + _listing([f"{i} ({'/'.join(m)})" for i, m in cov["partial"].items()]),
        f"- Tasks without a video (excluded from every average): {len(cov['missing_videos'])}"
        + _listing([str(i) for i in cov["missing_videos"]]),
        "- Anomalies found: " + (", ".join(f"{k} × {v}" for k, v in sorted(cov["anomalies"].items())) or "none"),
    ]
    if report.get("agreement"):
        lines += [
            "",
            "## Judge agreement",
            "",
            "| Dimension | Cohen's kappa (mean pairwise) | Percent agreement | Items | Repeats |",
            "|---|---|---|---|---|",
        ]
        for d in DIMENSIONS:
            a = report["agreement"][d]
            kappa = "–" if a["kappa"] is None else f"{a['kappa']:.3f}"
            lines.append(
                f"| {DIMENSION_TITLES[d]} | {kappa} | {a['percent_agreement']:.1f} % "
                f"| {a['n_items']} | {a['repeats']} |"
            )
    cost = report["cost"]
    lines += [
        "",
        "## Cost",
        "",
        f"- This run: {cost['requests']} judge requests, {cost['prompt_tokens']} prompt + "
        f"{cost['completion_tokens']} completion tokens, "
        f"${cost['cost_usd']:.4f}",
        f"- All judgements used (cached ones included): ${cost['cost_usd_total']:.4f}",
        "",
        f"Scoring: {SCORING_FORMULAS.get(scoring, scoring)}",
        "",
    ]
    return "\n".join(lines)


def _bar_chart(
    path: Path,
    title: str,
    groups: Sequence[str],
    series: dict[str, list[float | None]],
    errors: dict[str, list[tuple[float, float]] | None],
) -> None:
    from matplotlib.figure import Figure  # the eval extra

    fig = Figure(figsize=(9, 4.5), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        err = errors.get(name)
        yerr = [[lo for lo, _ in err], [hi for _, hi in err]] if err else None
        ax.bar(
            xs,
            heights,
            width,
            label=name,
            yerr=yerr,
            capsize=3,
            hatch=None if err else "//",
            alpha=1.0 if err else 0.55,
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path)


def _series(reports: Sequence[dict[str, Any]], section: str, keys: Sequence[str], references: Sequence[str]):
    series: dict[str, list[float | None]] = {}
    errors: dict[str, list[tuple[float, float]] | None] = {}
    for rep in reports:
        stats = [rep["overall"] if k == "average" else rep[section][k] for k in keys]
        series[rep["model"]] = [s["mean"] for s in stats]
        errors[rep["model"]] = [
            (s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]) if s["ci_low"] is not None else (0.0, 0.0)
            for s in stats
        ]
    for m in references:
        series[f"{m} (published)"] = [PUBLISHED[m][k] for k in keys]
        errors[f"{m} (published)"] = None
    return series, errors


def plot_reports(
    reports: Sequence[dict[str, Any]], out_dir: Path, references: Sequence[str] = REFERENCE_MODELS
) -> list[Path]:
    """Bar charts by level and by dimension, with the published models as reference bars."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, section, keys, labels in (
        ("by_level.png", "by_level", ("average", *LEVELS), ("Average", *LEVELS)),
        (
            "by_dimension.png",
            "by_dimension",
            ("average", *DIMENSIONS),
            ("Average", *(DIMENSION_TITLES[d] for d in DIMENSIONS)),
        ),
    ):
        series, errors = _series(reports, section, keys, references)
        path = out_dir / name
        _bar_chart(path, f"MicroWorldBench {section.replace('_', ' ')}", labels, series, errors)
        paths.append(path)
    return paths


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``by_level.png`` and ``by_dimension.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    paths["by_level"], paths["by_dimension"] = plot_reports([report], out_dir)
    logger.info("report written to %s", out_dir)
    return paths


def load_report(path: Path) -> dict[str, Any]:
    """Read a run's ``report.json`` (``path`` may be the run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report.json at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def compare_markdown(reports: Sequence[dict[str, Any]]) -> str:
    """Runs side by side (each with its scoring reading and judge protocol), then the published figures."""
    head = (
        "| Run | Judge | Valid | Reading | Average | "
        + " | ".join(LEVELS)
        + " | "
        + " | ".join(DIMENSION_TITLES[d] for d in DIMENSIONS)
        + " | Cost (USD) |"
    )
    lines = ["# MicroWorldBench comparison", "", head, "|" + "---|" * (6 + len(LEVELS) + len(DIMENSIONS))]
    readings = set()
    for rep in reports:
        cov = rep["coverage"]
        scoring, protocol = _reading(rep)
        readings.add(scoring)
        lines.append(
            f"| {rep['model']} | {rep['judge_model']} | {cov['valid']}/{cov['selected']} | {scoring} / {protocol} "
            f"| {_fmt(rep['overall'])} | "
            + " | ".join(_fmt(rep["by_level"][lv]) for lv in LEVELS)
            + " | "
            + " | ".join(_fmt(rep["by_dimension"][d]) for d in DIMENSIONS)
            + f" | {rep['cost']['cost_usd_total']:.4f} |"
        )
    for m in REFERENCE_MODELS:
        p = PUBLISHED[m]
        lines.append(
            f"| {m} (published) | – | 459 | published / upstream | {p['average']:.1f} | "
            + " | ".join(f"{p[lv]:.1f}" for lv in LEVELS)
            + " | "
            + " | ".join(f"{p[d]:.1f}" for d in DIMENSIONS)
            + " | – |"
        )
    lines += ["", "Reading = scoring reading / judge protocol."]
    lines += [f"- {name}: {SCORING_FORMULAS.get(name, name)}" for name in sorted(readings | {"published"})]
    if readings - {"published"}:
        lines.append(
            "- The published rows use the upstream (published) reading: they are not like-for-like with runs in "
            "another reading."
        )
    return "\n".join(lines) + "\n"
