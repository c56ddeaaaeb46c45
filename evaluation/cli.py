"""``microverse eval`` commands: run, agreement, import-upstream, compare.

Judge settings come from ``MICROVERSE_JUDGE_*`` variables (see :class:`JudgeConfig`) and
can be overridden by options. ``--debug`` judges 3 tasks with verbose logging.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .judge import PROTOCOLS, JudgeConfig, JudgeConfigError, VLMJudge
from .microworldbench import LEVELS, load_benchmark, select_tasks
from .physics.cli import physics_command
from .report import build_report, compare_markdown, load_report, plot_reports, render_markdown, write_report
from .runner import EvalResult, GenerationConfig, export_upstream, rescore_upstream, run_eval
from .scoring import SCORINGS

logger = logging.getLogger(__name__)


def _indices(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[int] | None:
    if not values:
        return None
    try:
        return [int(part) for value in values for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("task indices are integers, e.g. --index 1,5,9") from None


def _benchmark_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--benchmark",
        envvar="MICROVERSE_BENCHMARK",
        default=None,
        help="Folder with the MicroWorldBench files, or a base URL (default: upstream, cached locally).",
    )(f)


def _scoring_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--scoring",
        type=click.Choice(SCORINGS),
        default=SCORINGS[0],
        show_default=True,
        help="Scoring reading: corrected, or published (the upstream scorer bit for bit); see evaluation/README.md.",
    )(f)


def _judge_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--judge-base-url", help="OpenAI-compatible judge URL (env MICROVERSE_JUDGE_BASE_URL)."),
        click.option("--judge-api-key", help="Judge API key (env MICROVERSE_JUDGE_API_KEY)."),
        click.option("--judge-model", help="Judge model name (env MICROVERSE_JUDGE_MODEL)."),
        click.option(
            "--judge-protocol",
            type=click.Choice(list(PROTOCOLS)),
            help="Judge protocol: ours (default), or upstream to reproduce the published evaluator's requests "
            "(env MICROVERSE_JUDGE_PROTOCOL).",
        ),
        click.option("--concurrency", type=int, help="Judge requests in flight."),
        click.option("--rpm", type=float, help="Judge requests per minute (0: unlimited)."),
        click.option("--price-input", type=float, help="USD per million prompt tokens."),
        click.option("--price-output", type=float, help="USD per million completion tokens."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def _make_judge(kw: dict[str, Any]) -> VLMJudge:
    overrides = {
        "base_url": kw.pop("judge_base_url"),
        "api_key": kw.pop("judge_api_key"),
        "model": kw.pop("judge_model"),
        "protocol": kw.pop("judge_protocol"),
        "concurrency": kw.pop("concurrency"),
        "rpm": kw.pop("rpm"),
        "price_input_per_mtok": kw.pop("price_input"),
        "price_output_per_mtok": kw.pop("price_output"),
    }
    config = JudgeConfig(**{k: v for k, v in overrides.items() if v is not None})
    if not config.base_url:
        raise click.UsageError("no judge configured: pass --judge-base-url or set MICROVERSE_JUDGE_BASE_URL")
    return VLMJudge(config)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not debug:
        for noisy in ("httpx", "httpx2", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_eval(*args: Any, **kwargs: Any) -> EvalResult:
    """:func:`run_eval`, turning configuration problems into clean CLI errors."""
    try:
        return run_eval(*args, **kwargs)
    except (JudgeConfigError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group("eval")
def eval_group() -> None:
    """MicroWorldBench evaluation."""


@eval_group.command("run")
@click.option("--endpoint", help="Video API base URL (our /v1/videos API) to generate the videos.")
@click.option(
    "--videos",
    "videos_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <index>.mp4 files instead of --endpoint.",
)
@click.option("--model-name", required=True, help="Name of the evaluated video model (report and upstream export).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default runs/<model-name>).")
@_benchmark_option
@click.option(
    "--level", "levels", multiple=True, type=click.Choice(LEVELS), help="Only tasks of this level (repeatable)."
)
@click.option("--index", "indices", multiple=True, callback=_indices, help="Task indices, e.g. 1,5,9 (repeatable).")
@click.option("--sample", type=int, help="Seeded sample of N tasks, stratified by level.")
@click.option("--limit", type=int, help="At most N tasks (after the other selections).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and the bootstrap.")
@click.option("--endpoint-api-key", default="EMPTY", help="API key of the video endpoint.")
@click.option("--video-model", help="Video model name sent to the endpoint.")
@click.option("--size", help="Video size WxH, e.g. 832x480.")
@click.option("--seconds", help="Video duration.")
@click.option("--num-frames", type=int, help="Frames per video.")
@click.option("--steps", type=int, help="Inference steps.")
@click.option("--guidance-scale", type=float, help="CFG scale.")
@click.option("--negative-prompt", help="Negative prompt.")
@click.option(
    "--gen-concurrency", type=click.IntRange(1), default=4, show_default=True, help="Generation jobs queued at once."
)
@click.option("--gen-seed", type=int, default=0, show_default=True, help="Base generation seed (task i uses seed + i).")
@click.option("--reference-images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of per-task reference images (<task index>.png/.jpg/.webp) sent as input_reference, "
                   "for image-conditioned models (the benchmark itself is text-only).")
@click.option(
    "--agreement-tasks", type=int, default=0, show_default=True, help="Judge this many tasks repeatedly for agreement."
)
@click.option("--agreement-repeats", type=int, default=3, show_default=True, help="Judgements per agreement task.")
@click.option("--debug", is_flag=True, help="Judge 3 tasks with verbose logging.")
@_scoring_option
@_judge_options
def run_command(**kw: Any) -> None:
    """Generate (or read) videos, judge, score and report; resumable."""
    _setup_logging(kw["debug"])
    if bool(kw["endpoint"]) == bool(kw["videos_dir"]):
        raise click.UsageError("give exactly one of --endpoint and --videos")
    judge = _make_judge(kw)
    bench = load_benchmark(kw["benchmark"])
    limit = kw["limit"] or (3 if kw["debug"] else None)
    try:
        tasks = select_tasks(
            bench, levels=kw["levels"] or None, indices=kw["indices"], sample=kw["sample"], limit=limit, seed=kw["seed"]
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not tasks:
        raise click.UsageError("the selection holds no task")
    out = kw["out"] or Path("runs") / kw["model_name"]
    generation = None
    if kw["endpoint"]:
        generation = GenerationConfig(
            endpoint=kw["endpoint"],
            api_key=kw["endpoint_api_key"],
            model=kw["video_model"],
            size=kw["size"],
            seconds=kw["seconds"],
            num_frames=kw["num_frames"],
            num_inference_steps=kw["steps"],
            guidance_scale=kw["guidance_scale"],
            negative_prompt=kw["negative_prompt"],
            seed=kw["gen_seed"],
            max_in_flight=kw["gen_concurrency"],
            reference_images=kw["reference_images"],
        )
    result = _run_eval(
        bench,
        tasks,
        judge,
        out,
        kw["model_name"],
        videos_dir=kw["videos_dir"],
        generation=generation,
        agreement_tasks=kw["agreement_tasks"],
        agreement_repeats=kw["agreement_repeats"],
        seed=kw["seed"],
        scoring=kw["scoring"],
    )
    export_upstream(result, out / f"{kw['model_name']}_result.json")
    report = build_report(result, n_resamples=200 if kw["debug"] else 2000, seed=kw["seed"])
    paths = write_report(report, out)
    click.echo(render_markdown(report))
    click.echo(f"report: {paths['markdown']}")


@eval_group.command("agreement")
@click.option(
    "--videos",
    "videos_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <index>.mp4 files.",
)
@click.option("--model-name", required=True, help="Name of the evaluated video model.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default runs/<model-name>-agreement)."
)
@_benchmark_option
@click.option(
    "--tasks",
    "n_tasks",
    type=int,
    default=20,
    show_default=True,
    help="Tasks judged repeatedly (stratified sample of those with a video).",
)
@click.option("--repeats", type=int, default=3, show_default=True, help="Judgements per task.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@_judge_options
def agreement_command(**kw: Any) -> None:
    """Judge a subset k times; report Cohen's kappa and percent agreement per dimension."""
    _setup_logging(False)
    if kw["repeats"] < 2:
        raise click.BadParameter("--repeats must be at least 2")
    judge = _make_judge(kw)
    bench = load_benchmark(kw["benchmark"])
    available = [i for i in bench.tasks if (kw["videos_dir"] / f"{i}.mp4").is_file()]
    if not available:
        raise click.UsageError(f"no <index>.mp4 file of a benchmark task in {kw['videos_dir']}")
    tasks = select_tasks(bench, indices=available, sample=kw["n_tasks"], seed=kw["seed"])
    out = kw["out"] or Path("runs") / f"{kw['model_name']}-agreement"
    result = _run_eval(
        bench,
        tasks,
        judge,
        out,
        kw["model_name"],
        videos_dir=kw["videos_dir"],
        agreement_tasks=len(tasks),
        agreement_repeats=kw["repeats"],
        seed=kw["seed"],
    )
    write_report(build_report(result, seed=kw["seed"]), out)
    for dim, a in (result.agreement or {}).items():
        kappa = "undefined" if a.kappa is None else f"{a.kappa:.3f}"
        click.echo(
            f"{dim}: kappa {kappa}, agreement {a.percent_agreement:.1f} % over {a.n_items} items x {a.repeats} repeats"
        )


@eval_group.command("import-upstream")
@click.argument("result_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model-name", help="Model name (default: from <model>_result.json).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Report folder (default runs/<model>-upstream)."
)
@_benchmark_option
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@_scoring_option
def import_command(
    result_file: Path, model_name: str | None, out: Path | None, benchmark: str | None, seed: int, scoring: str
) -> None:
    """Rescore an upstream <model>_result.json in a scoring reading (published: the upstream scorer exactly)."""
    _setup_logging(False)
    bench = load_benchmark(benchmark)
    try:
        result = rescore_upstream(result_file, bench, model_name, scoring)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    out = out or Path("runs") / f"{result.model_name}-upstream"
    report = build_report(result, seed=seed)
    paths = write_report(report, out)
    click.echo(render_markdown(report))
    click.echo(f"report: {paths['markdown']}")


@eval_group.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Also write compare.md and the charts here."
)
def compare_command(runs: tuple[Path, ...], out: Path | None) -> None:
    """Set runs (folders or report.json files) side by side."""
    try:
        reports = [load_report(r) for r in runs]
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    text = compare_markdown(reports)
    click.echo(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text, encoding="utf-8")
        plot_reports(reports, out)


eval_group.add_command(physics_command)
