"""The ``microverse`` command: ``serve``, ``generate``, ``info``, ``bench`` and the ``eval`` / ``train`` /
``data`` groups of the evaluation and training packages.

The evaluation and training packages never import the serving package; the commands of theirs that run a
checkpoint (``eval physics --model``, ``train demo``, ``train demo-bench``) find the serving engine as the
click context object, an :class:`evaluation.physics.ModelRunner` that :func:`main` sets from
``microverse.sources``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click

from evaluation.cli import eval_group
from training.cli import data_group, train_group

from .config import Settings
from .sources import model_runner
from .tools.inference_bench import bench_command

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def settings_options(func):
    """Add one ``--flag`` per :class:`Settings` field (they mirror ``MICROVERSE_*``)."""
    for name, field in reversed(list(Settings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" [env MICROVERSE_{name.upper()}]"
        if field.annotation is bool:
            func = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(func)
        elif name == "lora":
            func = click.option(flag, name, multiple=True, help=help_text)(func)
        else:
            func = click.option(flag, name, default=None, help=help_text)(func)
    return func


def build_settings(overrides: dict) -> Settings:
    """Environment settings with the CLI flags that were given on top."""
    given = {k: v for k, v in overrides.items() if v not in (None, ())}
    if "lora" in given:
        given["lora"] = list(given["lora"])
    return Settings(**given)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """MicroVerse: serve, evaluate and train micro-world video models."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = model_runner()


@main.command()
@click.option("--port", default=3000, show_default=True, help="HTTP port.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Bind address.")
@settings_options
def serve(port: int, host: str, **overrides) -> None:
    """Serve the model with BentoML (``bentoml serve service:MicroVerse``)."""
    settings = build_settings(overrides)
    env = {**os.environ, **settings.to_env()}
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:MicroVerse", "--port", str(port), "--host", host]
    logger.info("starting: %s", " ".join(cmd))
    raise SystemExit(subprocess.call(cmd, cwd=REPO_ROOT, env=env))


@main.command()
@click.argument("prompt")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("out.mp4"),
              show_default=True, help="Where to write the mp4.")
@click.option("--negative-prompt", default=None)
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--num-frames", type=int, default=None)
@click.option("--steps", "num_inference_steps", type=int, default=None)
@click.option("--guidance-scale", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--fps", type=int, default=None)
@settings_options
def generate(prompt, output, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
             seed, fps, **overrides) -> None:
    """Generate one video locally (no server) and write it to OUTPUT."""
    from media.video import encode_mp4, write_atomic

    from .engine import DiffusersEngine
    from .runtime import limits_of
    from .schemas import GenerateRequest, InputError, resolve

    settings = build_settings(overrides)
    engine = DiffusersEngine.from_settings(settings)
    limits = limits_of(settings, engine)
    try:
        spec = resolve(GenerateRequest(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                                       num_frames=num_frames, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale, seed=seed, fps=fps),
                       engine.model.defaults, limits)
    except InputError as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{exc.param.replace('_', '-')}") from None
    from tqdm import tqdm

    with tqdm(total=spec.num_inference_steps, desc="denoising", unit="step") as bar:
        result = engine.generate([spec], on_step=lambda done, total: bar.update(done - bar.n))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, encode_mp4(result.videos[0], spec.fps))
    click.echo(json.dumps({"output": str(output), "seed": spec.seed, "frames": spec.num_frames,
                           "size": f"{spec.width}x{spec.height}", "denoise_s": round(result.denoise_seconds, 3),
                           "decode_s": round(result.decode_seconds, 3)}))


@main.command()
@click.option("--url", default=None,
              help="Ask a running server (e.g. http://127.0.0.1:3000) instead of loading locally.")
@settings_options
def info(url: str | None, **overrides) -> None:
    """Print what the model and runtime are (same as ``GET /info``)."""
    if url:
        import httpx

        click.echo(json.dumps(httpx.get(url.rstrip("/") + "/info", timeout=30).json(), indent=2))
        return
    import tempfile

    from .engine import DiffusersEngine
    from .runtime import Runtime

    settings = build_settings(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings.model_copy(update={"storage_dir": Path(tmp)})
        rt = Runtime.start(settings, engine=DiffusersEngine.from_settings(settings))
        click.echo(json.dumps(rt.info(), indent=2, default=str))
        rt.stop()


main.add_command(eval_group, "eval")
main.add_command(train_group, "train")
main.add_command(data_group, "data")
main.add_command(bench_command, "bench")

if __name__ == "__main__":
    main()
