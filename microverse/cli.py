"""The ``microverse`` command: ``serve``, ``generate``, ``info``, ``bench``, the ``jobs`` group (job database
check and recovery) and the ``eval`` / ``train`` / ``data`` groups of the evaluation and training packages.

The evaluation and training packages never import the serving package; the commands of theirs that run a
checkpoint (``eval physics --model``, ``train demo``, ``train demo-bench``, ``train distill``,
``train distill-bench``) find the serving engine as the
click context object, an :class:`evaluation.physics.ModelRunner` that :func:`main` sets from
``microverse.sources``.

Every command's errors end the same way (:class:`MainGroup`): click's usage errors exit 2, anything else a
command raises is one ``Error: ...`` line on stderr and exit 1, with the traceback only under
``microverse --verbose``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from evaluation.cli import eval_group
from training.cli import data_group, train_group

from .checkpoint_options import check_checkpoint_options
from .config import Settings
from .lifecycle import SERVER_PID_ENV
from .sources import model_runner
from .tools.inference_bench import bench_command

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30
"""Seconds open requests (a ``/generate`` waiting for its video) may hold up a stop before they are cut; well
inside a 60 s termination grace period."""


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
    """Environment settings with the CLI flags that were given on top; a bad value is a usage error naming
    its flag (and environment variable)."""
    from pydantic import ValidationError

    given = {k: v for k, v in overrides.items() if v not in (None, ())}
    if "lora" in given:
        given["lora"] = list(given["lora"])
    try:
        return Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        hint = f"--{name.replace('_', '-')} / MICROVERSE_{name.upper()}" if name else None
        raise click.BadParameter(f"{error['msg']}, got {error['input']!r}", param_hint=hint) from None


EXTRAS = {"scipy": "eval", "sklearn": "eval", "matplotlib": "eval", "tensorboard": "train", "scenedetect": "train"}
"""Modules only an optional extra installs, and that extra (``pyproject.toml``)."""


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: its message (with the type for errors that carry no message of their own)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
        return f"invalid {exc.title}: {problems}"
    text = " ".join(str(exc).split())
    if isinstance(exc, ModuleNotFoundError) and (extra := EXTRAS.get((exc.name or "").split(".")[0])):
        return f"this command needs the {extra} extra ({exc.name} is missing): pip install 'microverse[{extra}]'"
    if url := _request_url(exc):
        reason = " ".join(str(exc.__cause__ or exc).split()).split("] ", 1)[-1]
        return f"cannot reach {url}: {reason or type(exc).__name__}"
    if not text:
        return type(exc).__name__
    return text if isinstance(exc, (ValueError, RuntimeError, OSError)) else f"{type(exc).__name__}: {text}"


def _request_url(exc: BaseException) -> str | None:
    """The URL (without query) a connection error of httpx or openai failed on; None for other errors."""
    import httpx

    if not isinstance(exc, httpx.TransportError) and type(exc).__name__ != "APIConnectionError":
        return None
    try:
        return str(exc.request.url).split("?", 1)[0]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        return None


class UsageLine(click.ClickException):
    """A usage error shown as its one ``Error:`` line (no usage block), exit 2."""

    exit_code = 2


class MainGroup(click.Group):
    """The ``microverse`` group: every error of a command is one ``Error:`` line on stderr: usage errors (a bad
    option or argument, naming it) exit 2, anything else a command raises exits 1 (the traceback too under
    ``--verbose``); Ctrl-C exits 130 quietly."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise UsageLine(exc.format_message()) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            ctx.exit(130)
        except Exception as exc:
            verbose = bool(ctx.params.get("verbose"))
            if verbose:
                traceback.print_exc()
            hint = "" if verbose else " (run `microverse --verbose ...` for the traceback)"
            click.echo(f"Error: {error_line(exc)}{hint}", err=True)
            ctx.exit(1)


@click.group(cls=MainGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the traceback of an error.")
@click.version_option(package_name="microverse", prog_name="microverse")
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
    """Serve the model with BentoML (``bentoml serve microverse.service:MicroVerse``), from any directory.

    This process becomes the BentoML server (``exec``), so a SIGTERM or Ctrl-C reaches it directly; requests
    still open ``GRACEFUL_SHUTDOWN_S`` after it are cut, and the running batch goes back to the queue.
    """
    import ipaddress

    settings = build_settings(overrides)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name, which may resolve to any interface
        loopback = False
    if settings.api_key is None and not loopback:
        logger.warning("serving on %s without MICROVERSE_API_KEY: anyone who can reach this address can make, read "
                       "and delete videos; set MICROVERSE_API_KEY or bind --host 127.0.0.1", host)
    # The worker knows its server's pid from the start (lifecycle.SPAWN_PARENT_PID): this process becomes it.
    env = {**os.environ, **settings.to_env(), SERVER_PID_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "bentoml", "serve", "microverse.service:MicroVerse", "--port", str(port),
           "--host", host, "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S)]
    logger.info("starting: %s", " ".join(cmd))
    logging.shutdown()
    os.execve(sys.executable, cmd, env)


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
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reference image of an image-conditioned model (Wan I2V: required; TI2V: optional).")
@settings_options
def generate(prompt, output, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
             seed, fps, image, **overrides) -> None:
    """Generate one video locally (no server) and write it to OUTPUT."""
    from tqdm import tqdm

    from media.video import encode_mp4, write_atomic

    from .images import attach_reference
    from .parallel import engine_for
    from .runtime import limits_of
    from .schemas import GenerateRequest, InputError, resolve

    settings = build_settings(overrides)
    check_checkpoint_options(overrides["model"], overrides["lora"], overrides["transformer"])
    with engine_for(settings) as engine:
        try:
            spec = resolve(GenerateRequest(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                                           num_frames=num_frames, num_inference_steps=num_inference_steps,
                                           guidance_scale=guidance_scale, seed=seed, fps=fps),
                           engine.model.defaults, limits_of(settings, engine))
            spec = attach_reference(spec, engine.model.family, image.read_bytes() if image else None, "image",
                                    settings.storage_dir)
        except InputError as exc:
            raise click.BadParameter(exc.message, param_hint=f"--{exc.param.replace('_', '-')}") from None
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
    settings = build_settings(overrides)
    if url:
        click.echo(json.dumps(_remote_info(url, settings), indent=2))
        return
    import tempfile

    from .parallel import engine_for
    from .runtime import Runtime

    check_checkpoint_options(overrides["model"], overrides["lora"], overrides["transformer"])
    with tempfile.TemporaryDirectory() as tmp, engine_for(settings) as engine:
        settings = settings.model_copy(update={"storage_dir": Path(tmp)})
        rt = Runtime.start(settings, engine=engine)
        click.echo(json.dumps(rt.info(), indent=2, default=str))
        rt.stop()


def _remote_info(url: str, settings: Settings) -> dict:
    """``GET {url}/info`` (with ``--api-key`` / ``MICROVERSE_API_KEY`` when set); failures say what went wrong."""
    import httpx

    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"expected a URL such as http://127.0.0.1:3000, got {url!r}", param_hint="--url")
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
    try:
        response = httpx.get(base + "/info", headers=headers, timeout=30)
    except httpx.ConnectError as exc:
        reason = str(exc).split("] ", 1)[-1].lower() or "connection failed"
        raise click.ClickException(f"cannot reach {base}: {reason}") from None
    except httpx.TimeoutException:
        raise click.ClickException(f"{base} did not answer within 30 s") from None
    except httpx.TransportError as exc:
        raise click.ClickException(error_line(exc)) from None
    except httpx.HTTPError as exc:
        raise click.ClickException(f"GET {base}/info failed: {error_line(exc)}") from None
    if response.status_code in (401, 403):
        raise click.ClickException(f"{base}/info answered {response.status_code}: pass the server's key with "
                                   "--api-key or MICROVERSE_API_KEY")
    if response.status_code != 200:
        body = " ".join(response.text.split())[:200]
        raise click.ClickException(f"{base}/info answered {response.status_code}: {body}")
    try:
        return response.json()
    except ValueError:
        raise click.ClickException(f"{base}/info did not answer JSON: is it a MicroVerse server?") from None


main.add_command(eval_group, "eval")
main.add_command(train_group, "train")
main.add_command(data_group, "data")
main.add_command(bench_command, "bench")

@main.group("jobs")
def jobs_group() -> None:
    """Check or recover the job database of a storage dir (run these with the service stopped)."""


def storage_dir_option(func):
    return click.option("--storage-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                        default=None, help="The service's storage dir [default: MICROVERSE_STORAGE_DIR's].")(func)


@jobs_group.command("check")
@storage_dir_option
def jobs_check(storage_dir: Path | None) -> None:
    """Say whether the service can open the job database (exit 1 when it cannot)."""
    from .recovery import check_database

    root = storage_dir or Settings().storage_dir
    problem = check_database(root)
    if problem is not None:
        raise click.ClickException(f"the job database in {root} is unusable: {problem}; "
                                   f"run `microverse jobs recover --storage-dir {root}`")
    click.echo(f"the job database in {root} is usable")


@jobs_group.command("recover")
@storage_dir_option
@click.option("--delete-orphans", is_flag=True, help="Also delete the job files no job refers to.")
def jobs_recover(storage_dir: Path | None, delete_orphans: bool) -> None:
    """Move an unusable job database aside (never deleted), salvage every readable job into a new one and list
    the job files no job refers to."""
    from .recovery import recover

    root = storage_dir or Settings().storage_dir
    report = recover(root, delete_orphans=delete_orphans)
    if report.problem is None:
        click.echo(f"the job database in {root} is usable; nothing to recover")
    else:
        click.echo(f"the job database was unusable ({report.problem})")
        click.echo(f"moved aside to {report.moved_to}" if report.moved_to else "there was no database file")
        click.echo(f"{report.salvaged} job(s) salvaged into a new {root / 'jobs.sqlite3'}")
    if report.orphans:
        verb = "deleted" if report.orphans_deleted else "left in place (delete them with --delete-orphans)"
        click.echo(f"{len(report.orphans)} job file(s) belong to no job: {verb}")


if __name__ == "__main__":
    main()
