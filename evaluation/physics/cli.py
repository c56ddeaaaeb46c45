"""``microverse eval physics``: per-process physics accuracy of video sources against simulator ground truth.

``--model`` runs a checkpoint through the :class:`~evaluation.physics.sources.ModelRunner` found as the click
context object (``microverse.cli`` sets the serving engine's); the other sources need nothing from above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import click

from simulator.render import parse_processes

from .cases import HELDOUT_SEED, Generate, PhysicsReport, acceptance_checks, evaluate_physics, heldout_cases
from .report import write_report
from .sources import (
    ModelRunner,
    folder_cases,
    load_vae,
    simulator_generate,
    simulator_prompt_generate,
    through_vae,
)

logger = logging.getLogger(__name__)

#: A labelled source: label, ``generate`` for the held-out cases, ``generate`` for the acceptance prompts.
Source = tuple[str, Generate, Generate]


def processes_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    """Click callback of a ``--processes`` option: the parsed names, a usage error naming an unknown one."""
    try:
        return parse_processes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _runner(ctx: click.Context) -> ModelRunner:
    """The context's :class:`ModelRunner`; a usage error when the command runs without one."""
    runner = ctx.find_object(ModelRunner)
    if runner is None:
        raise click.UsageError("--model needs the serving engine: run it as `microverse eval physics`")
    return runner


def _heldout_sources(ctx: click.Context, opts: dict, cases) -> list[Source]:
    """The simulator, VAE and model sources (those evaluated on the held-out cases)."""
    size, frames = opts["size"], opts["frames"]
    sources: list[Source] = []
    if opts["sources"]:
        sources.append(("simulator", simulator_generate(cases), simulator_prompt_generate(size, frames)))
    for path in opts["vaes"]:
        vae = load_vae(path)
        prompt_gen = through_vae(simulator_prompt_generate(size, frames), vae)
        sources.append((f"vae:{Path(path).name}", through_vae(simulator_generate(cases), vae), prompt_gen))
    for path in opts["models"]:
        gen = _runner(ctx).generate(path, size, frames, opts["steps"], opts["guidance_scale"])
        sources.append((f"model:{path.name}", gen, gen))
    return sources


def _heldout_reports(ctx: click.Context, opts: dict, procs: Sequence[str] | None) -> list[PhysicsReport]:
    """Reports of the simulator, VAE and model sources, with acceptance checks unless disabled."""
    if not (opts["sources"] or opts["models"] or opts["vaes"]):
        return []
    cases = heldout_cases(opts["n_per_process"], opts["seed"], opts["size"], opts["frames"], procs)
    reports = []
    for label, gen, prompt_gen in _heldout_sources(ctx, opts, cases):
        report = evaluate_physics(gen, cases, label)
        if opts["acceptance_seeds"]:
            report.acceptance = acceptance_checks(prompt_gen, range(opts["acceptance_seeds"]))
        reports.append(report)
    return reports


def _folder_report(folder: Path, procs: Sequence[str] | None) -> PhysicsReport:
    """Report of a folder of clips in ``write_dataset``'s format (restricted to ``procs`` when given)."""
    cases, gen = folder_cases(folder)
    if procs:
        cases = [c for c in cases if c.process in procs]
    return evaluate_physics(gen, cases, f"videos:{folder.name}")


@click.command("physics")
@click.option(
    "--source", "sources", type=click.Choice(["simulator"]), multiple=True, help="Real simulator clips (the ceiling)."
)
@click.option(
    "--videos",
    "videos_dirs",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Folder of mp4 clips with a metadata.json of prompts, process and params (write_dataset format).",
)
@click.option(
    "--model",
    "models",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Checkpoint folder run through the serving engine (e.g. an untrained model: the floor).",
)
@click.option(
    "--vae",
    "vaes",
    multiple=True,
    help="VAE folder, or pipeline folder / Hugging Face id with a vae/ subfolder: the simulator clips "
    "through its encode and decode (the reconstruction ceiling of models using it).",
)
@click.option(
    "--n-per-process",
    type=int,
    default=10,
    show_default=True,
    help="Held-out cases per process (simulator and model sources).",
)
@click.option("--seed", type=int, default=HELDOUT_SEED, show_default=True, help="Base seed of the held-out cases.")
@click.option("--size", type=int, default=64, show_default=True, help="Frame width and height.")
@click.option("--frames", type=int, default=17, show_default=True, help="Frames per video.")
@click.option("--processes", default=None, callback=processes_option, help="Comma-separated subset of processes.")
@click.option("--steps", type=int, default=20, show_default=True, help="Denoising steps for --model.")
@click.option(
    "--guidance-scale", type=float, default=5.0, show_default=True, help="Classifier-free guidance for --model."
)
@click.option(
    "--acceptance-seeds",
    type=int,
    default=10,
    show_default=True,
    help="Seeds of issue 5's acceptance checks for simulator and model sources (0: skip).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("physics_eval"),
    show_default=True,
)
@click.pass_context
def physics_command(ctx: click.Context, **opts) -> None:
    """Physics-grounded metrics: per-process accuracy of videos against simulator ground truth."""
    if not (opts["sources"] or opts["videos_dirs"] or opts["models"] or opts["vaes"]):
        opts["sources"] = ("simulator",)
    procs = opts["processes"]
    reports = _heldout_reports(ctx, opts, procs)
    reports += [_folder_report(folder, procs) for folder in opts["videos_dirs"]]
    paths = write_report(reports, opts["out_dir"])
    click.echo(paths["markdown"].read_text())
    click.echo(f"report written to {opts['out_dir']}")
