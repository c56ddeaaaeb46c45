"""Click groups wired into the ``microverse`` CLI as ``microverse train`` and ``microverse data``.

Also runnable as ``python -m training.cli train ...`` / ``python -m training.cli data ...``, except ``train demo``,
``train demo-bench``, ``train distill`` (its benchmark) and ``train distill-bench``: they run checkpoints through
the serving engine, which training never imports, so they take it as the
:class:`~evaluation.physics.ModelRunner` that ``microverse.cli`` sets as the click context object.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from evaluation.physics import ModelRunner
from evaluation.physics.cli import processes_option
from simulator.dataset import write_dataset
from simulator.render import LOOKS, PROCESSES, check_looks
from simulator.speed import single_core_speed
from training.data.cli import register as register_pipeline_commands

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load_config(spec: str, overrides: tuple[str, ...], spec_hint: str):
    """The config of ``spec`` with ``--set`` overrides; a bad spec, field or value is a usage error naming it."""
    from training.config import ConfigError, apply_overrides, load_config

    try:
        cfg = load_config(spec)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=spec_hint) from None
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


def _check_inputs(cfg) -> None:
    """Refuse a run whose dataset or local base model is not there, before anything loads."""
    from training.config import debug_config

    dataset = Path(cfg.data.dataset)
    if not (dataset / "metadata.json").is_file():
        raise click.UsageError(
            f"data.dataset={dataset}: no metadata.json there; build a training set first (`microverse data simulate` "
            "or `microverse data build`) or point --set data.dataset=FOLDER at one")
    pretrained = cfg.model.pretrained
    tiny = pretrained == debug_config().model.pretrained
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1
    if not Path(pretrained).expanduser().exists() and (looks_local or tiny):
        build = (f"build the debug config's tiny pipeline with `python -c \"from microverse.tools.tiny import "
                 f"save_tiny_pipeline; save_tiny_pipeline('{pretrained}')\"` or " if tiny else "")
        raise click.UsageError(f"model.pretrained={pretrained}: no such folder; {build}point --set "
                               "model.pretrained=... at a diffusers Wan pipeline folder or Hugging Face id")


def _model_runner(ctx: click.Context) -> ModelRunner:
    """The serving engine's :class:`ModelRunner`, which ``microverse.cli`` sets as the context object."""
    runner = ctx.find_object(ModelRunner)
    if runner is None:
        name = ctx.info_name
        raise click.UsageError(f"{name} needs the serving engine: run it as `microverse train {name}`")
    return runner


@click.group("train", invoke_without_command=True)
@click.option("--config", "config_spec", help="Registered config name (debug, lora-1.3b, full-1.3b) or YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field, e.g. optim.lr=1e-4 (repeatable; checked against the field's type).")
@click.option("--until-step", type=int, help="Stop (with a checkpoint) after this global step; rerun to resume.")
@click.pass_context
def train_group(
    ctx: click.Context, config_spec: str | None, overrides: tuple[str, ...], until_step: int | None
) -> None:
    """Fine-tune Wan2.1 (LoRA or full). Wrap in `accelerate launch` for several processes/nodes."""
    if ctx.invoked_subcommand is not None:
        return
    if not config_spec:
        raise click.UsageError("give --config CONFIG or a subcommand")
    from training.trainer import train

    cfg = _load_config(config_spec, overrides, "--config")
    _check_inputs(cfg)
    _setup_logging()
    out = train(cfg, until_step=until_step)
    click.echo(str(out))


@train_group.command("show-config")
@click.argument("config_spec")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field, e.g. optim.lr=1e-4.")
def show_config(config_spec: str, overrides: tuple[str, ...]) -> None:
    """Print a config as YAML (a starting point for your own)."""
    import yaml

    from training.config import config_to_dict

    cfg = _load_config(config_spec, overrides, "CONFIG_SPEC")
    click.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


@train_group.command("export")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["diffusers", "upstream"]), default="diffusers", show_default=True)
def export_cmd(checkpoint: str, out: str, fmt: str) -> None:
    """Export CHECKPOINT (run folder, checkpoint folder or export folder) to OUT."""
    from training.export import export_checkpoint

    _setup_logging()
    click.echo(str(export_checkpoint(checkpoint, out, fmt)))


@train_group.command("convert")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["diffusers", "upstream"]), required=True)
@click.option("--base", help="Wan pipeline/transformer folder or HF id (config of a full upstream checkpoint).")
def convert_cmd(src: str, dst: str, to: str, base: str | None) -> None:
    """Convert a LoRA or full checkpoint between diffusers and upstream MicroVerse formats."""
    from training.convert import convert_checkpoint

    _setup_logging()
    click.echo(str(convert_checkpoint(src, dst, to=to, base=base)))


@train_group.command("export-bento")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--name", required=True, help="BentoML model name.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
def export_bento_cmd(checkpoint: str, name: str, labels: tuple[str, ...]) -> None:
    """Register CHECKPOINT in the BentoML model store; prints the tag."""
    from training.export import export_bento

    if bad := [label for label in labels if "=" not in label]:
        raise click.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}", param_hint="--label")
    _setup_logging()
    click.echo(export_bento(checkpoint, name, dict(label.split("=", 1) for label in labels)))


@train_group.command("benchmark")
@click.option("--size", type=click.Choice(["1.3b", "14b", "tiny"]), default="1.3b", show_default=True)
@click.option("--shape", default="81x480x832", show_default=True, help="FRAMESxHEIGHTxWIDTH of the clip.")
@click.option("--mode", type=click.Choice(["lora", "full"]), default="lora", show_default=True)
@click.option("--lora-rank", default=32, show_default=True)
@click.option("--no-gradient-checkpointing", is_flag=True)
@click.option("--steps", default=5, show_default=True)
@click.option("--out", type=click.Path(), help="Write the result as JSON here (e.g. docs/training-benchmark.json).")
def benchmark_cmd(size, shape, mode, lora_rank, no_gradient_checkpointing, steps, out) -> None:
    """Seconds per step and peak memory of DiT training at SIZE (random weights, cached-latent step)."""
    from training.config import ModelConfig
    from training.step_speed import benchmark, write_result

    _setup_logging()
    model = ModelConfig(
        mode=mode, lora_rank=lora_rank, lora_alpha=lora_rank, gradient_checkpointing=not no_gradient_checkpointing,
        base_dtype="bfloat16" if mode == "lora" else "float32",
    )  # fmt: skip
    try:
        frames, height, width = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected FRAMESxHEIGHTxWIDTH, e.g. 81x480x832; got {shape!r}",
                                 param_hint="--shape") from None
    result = benchmark(size, (frames, height, width), model, steps=steps)
    if out:
        write_result(result, out)
    click.echo(json.dumps(result, indent=2))


@train_group.command("vae")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset with metadata.json.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to save the VAE.")
@click.option("--size", default=64, show_default=True, help="Clip size (square).")
@click.option("--frames", default=17, show_default=True, help="Frames per clip (4k+1).")
@click.option("--steps", default=2000, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--base-dim", default=16, show_default=True, help="Base channels of the VAE.")
@click.option("--z-dim", default=4, show_default=True, help="Latent channels.")
@click.option("--spatial-downsamples", default=3, show_default=True, help="2x spatial downsamplings (3: 8x).")
@click.option("--temporal-downsamples", default=2, show_default=True, help="Of those, how many halve time too.")
@click.option("--crop-size", type=int, help="Train on random square crops of this size (default: whole frames).")
@click.option("--crop-candidates", default=1, show_default=True,
              help="Random windows per crop; the one with the most foreground is used.")
@click.option("--foreground-weight", default=0.0, show_default=True,
              help="Extra L1 weight by distance from the clip's median colour (small objects on flat backgrounds).")
@click.option("--lr", default=3e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
def vae_cmd(data, out, size, frames, steps, batch_size, base_dim, z_dim, spatial_downsamples, temporal_downsamples,
            crop_size, crop_candidates, foreground_weight, lr, seed) -> None:
    """Train a small Wan VAE on DATA (for models too small for the real Wan2.1 VAE, e.g. the demo)."""
    from training.vae import VAETrainConfig, train_vae

    _setup_logging()
    metrics = train_vae(VAETrainConfig(data=data, out=out, size=size, frames=frames, steps=steps,
                                       batch_size=batch_size, base_dim=base_dim, z_dim=z_dim,
                                       spatial_downsamples=spatial_downsamples,
                                       temporal_downsamples=temporal_downsamples, crop_size=crop_size,
                                       crop_candidates=crop_candidates, foreground_weight=foreground_weight,
                                       lr=lr, seed=seed))
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))


@train_group.command("demo")
@click.option("--out", default="outputs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Working folder; every stage resumes from what is there.")
@click.option("--config", "config_name", default="demo", show_default=True,
              type=click.Choice(["demo", "demo-debug"]), help="Recipe (demo-debug: seconds, for tests).")
@click.option("--compare", type=click.Path(exists=True, file_okay=False),
              help="A demo model folder whose demo_metrics.json the new metrics are checked against.")
@click.pass_context
def demo_cmd(ctx: click.Context, out: str, config_name: str, compare: str | None) -> None:
    """Train the demo model from scratch on simulator clips, evaluate it, write its model card."""
    from training.demo import DEMO_CONFIGS, build_demo

    runner = _model_runner(ctx)
    _setup_logging()
    metrics = build_demo(DEMO_CONFIGS[config_name](), out, runner, reference=compare)
    summary = {k: metrics[k] for k in ("acceptance", "physics_accuracy", "timings")}
    summary["generation_seconds"] = metrics["generation"]["seconds_median"]
    if "reproduction" in metrics:
        summary["reproduction"] = metrics["reproduction"]
    click.echo(json.dumps(summary, indent=2))


@train_group.command("demo-bench")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--repeats", default=5, show_default=True)
@click.pass_context
def demo_bench_cmd(ctx: click.Context, model: str, repeats: int) -> None:
    """Seconds to generate MODEL's default clip through the serving engine (median of REPEATS after a warm-up)."""
    runner = _model_runner(ctx)
    _setup_logging()
    click.echo(json.dumps(runner.benchmark(model, repeats), indent=2))


@train_group.command("distill")
@click.option("--out", default="outputs/distill", show_default=True, type=click.Path(file_okay=False),
              help="Working folder; every stage resumes from what is there.")
@click.option("--config", "config_name", default="demo", show_default=True, type=click.Choice(["demo", "debug"]),
              help="Recipe (debug: seconds, for tests).")
@click.option("--teacher", type=click.Path(exists=True, file_okay=False),
              help="Teacher model folder (default: the embedded demo model).")
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Benchmark the student against the teacher and write its model card.")
@click.pass_context
def distill_cmd(ctx: click.Context, out: str, config_name: str, teacher: str | None, bench: bool) -> None:
    """Distil TEACHER into a few-step, CFG-free LoRA student (rectified-flow reflow, InstaFlow)."""
    from dataclasses import replace

    from training.distill import DISTILL_CONFIGS, distill, write_card

    runner = _model_runner(ctx) if bench else None
    _setup_logging()
    cfg = DISTILL_CONFIGS[config_name]()
    if teacher is not None:
        cfg = replace(cfg, teacher=teacher)
    student = distill(cfg, out)
    if runner is not None:
        click.echo(write_card(cfg, student, runner))
    click.echo(f"student: {student}")


@train_group.command("distill-bench")
@click.argument("student", type=click.Path(exists=True))
@click.option("--teacher", type=click.Path(exists=True, file_okay=False),
              help="Teacher model folder (default: the embedded demo model).")
@click.option("--per-process", default=10, show_default=True, help="Held-out physics cases per process.")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@click.pass_context
def distill_bench_cmd(ctx: click.Context, student: str, teacher: str | None, per_process: int,
                      json_out: str | None) -> None:  # fmt: skip
    """Seconds per clip and physics accuracy, in one run on the held-out cases, of the teacher (its default
    steps and CFG), its fast preset, and STUDENT (a LoRA) at each step count it was trained for."""
    from dataclasses import replace

    from training.distill import bench_table, benchmark, student_config

    runner = _model_runner(ctx)
    _setup_logging()
    cfg = replace(student_config(student), eval_per_process=per_process)
    if teacher is not None:
        cfg = replace(cfg, teacher=teacher)
    result = benchmark(cfg, student, runner)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    click.echo(bench_table(result))
    click.echo(json.dumps(result["acceptance"], indent=2))


@click.group("data")
def data_group() -> None:
    """Build a training set: MicroSim-style from raw videos (each stage resumable), or simulator clips."""


register_pipeline_commands(data_group)


@data_group.command("simulate")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
)
@click.option("-n", "--n", "n_clips", type=int, default=600, show_default=True, help="Number of clips.")
@click.option("--size", type=int, default=64, show_default=True, help="Frame height and width in pixels.")
@click.option("--frames", type=int, default=17, show_default=True, help="Frames per clip (Wan: 4k+1).")
@click.option("--fps", type=int, default=16, show_default=True, help="Frame rate written to the mp4.")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed; same seed, same dataset.")
@click.option(
    "--processes", default=None, callback=processes_option, help=f"Comma-separated subset of: {', '.join(PROCESSES)}."
)
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes.")
@click.option(
    "--looks", default=",".join(LOOKS), show_default=True, help="Comma-separated looks each clip's is drawn from."
)
def simulate_command(out_dir, n_clips, size, frames, fps, seed, processes, workers, looks) -> None:
    """Render a simulator dataset (mp4 clips + metadata.json + ground truth); byte-identical for the same seed."""
    names = [x.strip() for x in looks.split(",") if x.strip()]
    try:
        check_looks(names)
    except KeyError as exc:
        raise click.BadParameter(exc.args[0], param_hint="--looks") from exc
    meta = write_dataset(out_dir, n_clips, size, frames, fps, seed, processes, workers, names)
    click.echo(f"wrote {n_clips} clips, metadata at {meta}")


@data_group.command("simulate-speed")
@click.option("-n", "--n", "n_clips", type=int, default=600, show_default=True, help="Clips per measurement.")
@click.option("--size", type=int, default=64, show_default=True, help="Frame height and width in pixels.")
@click.option("--frames", type=int, default=17, show_default=True, help="Frames per clip.")
def simulate_speed_command(n_clips, size, frames) -> None:
    """Measure single-core simulator throughput (render only, and render + H.264 encode)."""
    rates = single_core_speed(n_clips, size, frames)
    click.echo(f"{n_clips} clips of {size}x{size}x{frames} on one core")
    for name, (wall, cpu) in rates.items():
        click.echo(f"{name + ':':17s}{wall:8.1f} clips/s wall, {cpu:8.1f} clips per CPU-second")


@click.group()
def main() -> None:
    """Training entry point when run as ``python -m training.cli``."""


main.add_command(train_group, "train")
main.add_command(data_group, "data")

if __name__ == "__main__":
    main()
