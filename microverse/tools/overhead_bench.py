"""Service overhead benchmark: ``POST /generate`` on a running service against a direct engine call.

Both sides use the same checkpoint, prompt, seed and settings, in one run, alternating, and the
script prints the ratio of medians (service / direct). The difference is what the service adds:
HTTP, validation, the durable queue, the worker hand-off and H.264 encoding.

    python -m microverse.tools.overhead_bench [--model PATH] [--height 256 --width 256 --num-frames 33 --steps 20]
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import click
import httpx

from ..config import Settings
from ..engine import DiffusersEngine
from ..schemas import GenerationSpec
from .service_process import free_port, spawn_service, stop_service, wait_ready

logger = logging.getLogger(__name__)
@click.command()
@click.option("--model", default=None, help="Checkpoint (default: the embedded model).")
@click.option("--height", type=int, default=256, show_default=True)
@click.option("--width", type=int, default=256, show_default=True)
@click.option("--num-frames", type=int, default=33, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per side (after one warm-up).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write JSON here.")
def main(model, height, width, num_frames, steps, repeats, output) -> None:
    """Print seconds per video direct and through the service, and their ratio."""
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="microverse-bench-") as tmp:
        settings = Settings(model=model, storage_dir=Path(tmp) / "direct", max_batch_wait_ms=0)
        env = {**settings.to_env(), "MICROVERSE_STORAGE_DIR": str(Path(tmp) / "service")}
        spec = GenerationSpec(prompt="a cell divides into two daughter cells, fluorescence microscopy",
                              negative_prompt="", height=height, width=width, num_frames=num_frames,
                              num_inference_steps=steps, guidance_scale=5.0, seed=0, fps=16)
        engine = DiffusersEngine.from_settings(settings)
        port, log = free_port(), Path(tmp) / "service.log"
        proc = spawn_service(env, port, log)
        body = {k: getattr(spec, k) for k in ("prompt", "negative_prompt", "height", "width", "num_frames",
                                                 "guidance_scale", "seed", "fps")}
        body["num_inference_steps"] = steps
        direct, service = [], []
        try:
            wait_ready(proc, port, log)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
                for i in range(repeats + 1):  # the first round warms both sides up
                    t0 = time.perf_counter()
                    engine.generate([spec])
                    t1 = time.perf_counter()
                    resp = client.post("/generate", json=body)
                    t2 = time.perf_counter()
                    resp.raise_for_status()
                    if i:
                        direct.append(t1 - t0)
                        service.append(t2 - t1)
        finally:
            stop_service(proc)
    result = {
        "model": engine.model.name, "device": engine.choice.device, "size": f"{width}x{height}",
        "num_frames": num_frames, "steps": steps, "repeats": repeats,
        "direct_s_median": statistics.median(direct), "service_s_median": statistics.median(service),
        "ratio": statistics.median(service) / statistics.median(direct),
        "direct_s": direct, "service_s": service,
    }
    click.echo(f"direct engine call : {result['direct_s_median']:.3f} s/video (median of {repeats})")
    click.echo(f"through the service: {result['service_s_median']:.3f} s/video (HTTP + queue + encode)")
    click.echo(f"overhead ratio     : {result['ratio']:.3f}")
    if output:
        output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
