"""Context parallelism on CPU with gloo: the split transformer forward and the two-rank engine equal one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from microverse.parallel import layout_for
from microverse.schemas import GenerationSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_layout_prefers_ulysses_within_the_head_count():
    assert (layout_for(2, 12).ulysses_degree, layout_for(2, 12).ring_degree) == (2, 1)
    assert (layout_for(8, 12).ulysses_degree, layout_for(8, 12).ring_degree) == (4, 2)
    assert (layout_for(5, 12).ulysses_degree, layout_for(5, 12).ring_degree) == (1, 5)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 32, 32, generator=g)


def _split_forward(rank: int, world_size: int, model_dir: str, port: int, out: str) -> None:
    from diffusers import WanTransformer3DModel

    from microverse.parallel import enable_context_parallel, init_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group(rank, world_size, "cpu")
    transformer = WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    enable_context_parallel(transformer, world_size)
    seen = []
    transformer.blocks[1].register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1]),
                                                    with_kwargs=True)
    x, t, e = inputs()
    with torch.inference_mode():
        y = transformer(x, t, e, return_dict=False)[0]
    torch.save({"y": y, "tokens_per_rank": seen[0]}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_split_forward_equals_single_process(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp
    from diffusers import WanTransformer3DModel

    from microverse.parallel import _free_port

    out = str(tmp_path / "y")
    mp.spawn(_split_forward, args=(2, str(tiny_model_dir), _free_port(), out), nprocs=2)
    transformer = WanTransformer3DModel.from_pretrained(str(tiny_model_dir), subfolder="transformer").eval()
    with torch.inference_mode():
        ref = transformer(*inputs(), return_dict=False)[0]
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["tokens_per_rank"] == 3 * 4 * 4 // 2  # each rank holds half of the 48 video tokens
        assert float((got["y"] - ref).norm() / ref.norm()) < 1e-5


def run_two_rank_engine(model_dir: str, out: str) -> None:
    """Rank 0 of a two-rank CPU group launched from one process, as a BentoML worker would."""
    from microverse.config import Settings
    from microverse.engine import GenerationCancelled
    from microverse.parallel import launch
    from tests.test_presets import spec

    engine = launch(Settings(model=model_dir, device="cpu", storage_dir=out + ".s"), 2)
    try:
        steps = []
        with pytest.raises(GenerationCancelled):
            engine.generate([spec(seed=7)], on_step=lambda d, t: steps.append(d), should_cancel=lambda: len(steps) >= 2)
        result = engine.generate([spec(seed=7), spec(prompt="bacteria swimming", seed=8)])
        fast = engine.generate([spec(seed=9, preset="fast")])
        torch.save({"latents": result.latents, "fast": fast.latents, "cancelled_after": len(steps),
                    "layout": engine.layout, "cache_threshold": engine.engine.options.fast_cache_threshold}, out)
    finally:
        engine.close()


def test_two_rank_engine_equals_single_engine(tiny_model_dir, tmp_path):
    from microverse.config import Settings
    from microverse.engine import DiffusersEngine
    from tests.test_presets import spec

    out = str(tmp_path / "engine.pt")
    code = f"from tests.test_parallel import run_two_rank_engine; run_two_rank_engine({str(tiny_model_dir)!r}, {out!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["cancelled_after"] == 2 and got["layout"].ulysses_degree == 2
    assert got["cache_threshold"] == 0  # the step cache would let ranks diverge; fast runs without it
    single = DiffusersEngine.from_settings(Settings(model=str(tiny_model_dir), device="cpu", storage_dir=tmp_path,
                                                    fast_cache_threshold=0))
    ref = single.generate([spec(seed=7), spec(prompt="bacteria swimming", seed=8)]).latents
    assert float((got["latents"] - ref).norm() / ref.norm()) < 1e-5
    ref_fast = single.generate([spec(seed=9, preset="fast")]).latents
    assert float((got["fast"] - ref_fast).norm() / ref_fast.norm()) < 1e-5


BODY = {"prompt": "a cell divides", "negative_prompt": "", "height": 32, "width": 32, "num_frames": 5,
        "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 5, "fps": 8}
"""One small request, posted to the service and run on the engine."""


def test_settings_refuse_what_context_parallel_cannot_run(monkeypatch):
    from pydantic import ValidationError

    from microverse import parallel
    from microverse.config import Settings
    from microverse.optimize import ConfigError

    with pytest.raises(ValidationError, match="context_parallel"):
        Settings(context_parallel=0)
    monkeypatch.setattr(parallel, "visible_gpus", lambda: 2)
    parallel.check_settings(Settings(context_parallel=2), "cuda")
    refused = {"MICROVERSE_CONTEXT_PARALLEL=4 needs 4 GPUs; this process sees 2": Settings(context_parallel=4),
               "cannot run with MICROVERSE_OFFLOAD=model": Settings(context_parallel=2, offload="model"),
               "cannot run with MICROVERSE_ATTENTION_BACKEND=flash3": Settings(context_parallel=2,
                                                                               attention_backend="flash3")}
    for message, settings in refused.items():
        with pytest.raises(ConfigError, match=message):
            parallel.check_settings(settings, "cuda")


def run_two_rank_runtime(model_dir: str, storage: str, out: str) -> None:
    """The service's runtime with ``context_parallel=2``, in a process of its own (rank 0 joins a process group):
    one ``POST /generate`` through the job queue, one engine call, then the runtime's stop."""
    from fastapi.testclient import TestClient

    from microverse.api import create_app
    from microverse.config import Settings
    from microverse.runtime import Runtime

    rt = Runtime.start(Settings(model=model_dir, device="cpu", storage_dir=storage, context_parallel=2))
    try:
        app = create_app()
        app.state.runtime = rt
        response = TestClient(app).post("/generate", json=BODY)
        result = rt.engine.generate([GenerationSpec(**BODY)])
    finally:
        ranks = list(getattr(rt.engine, "processes", []))
        rt.stop()
    torch.save({"engine": type(rt.engine).__name__, "status": response.status_code, "mp4": response.content,
                "video": result.videos[0], "latents": result.latents, "ranks": len(ranks),
                "alive_after_stop": [p.is_alive() for p in ranks]}, out)


def test_service_runtime_with_two_ranks_equals_one_process(tiny_model_dir, tmp_path, make_client):
    from media.video import read_video

    out = str(tmp_path / "runtime.pt")
    code = ("from tests.test_parallel import run_two_rank_runtime; "
            f"run_two_rank_runtime({str(tiny_model_dir)!r}, {str(tmp_path / 'cp')!r}, {out!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["engine"] == "ParallelEngine" and got["status"] == 200
    assert got["ranks"] == 1 and got["alive_after_stop"] == [False]  # the runtime's stop ended rank 1
    client = make_client(device="cpu")
    single = client.app.state.runtime.engine.generate([GenerationSpec(**BODY)])
    assert float((got["latents"] - single.latents).norm() / single.latents.norm()) < 1e-5
    assert max_diff(got["video"], single.videos[0]) <= 1
    ref_mp4 = client.post("/generate", json=BODY).content
    assert max_diff(read_video(got["mp4"])[0], read_video(ref_mp4)[0]) <= 2


def max_diff(a, b) -> int:
    """Largest absolute difference of two uint8 arrays of the same shape."""
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_real_server_with_two_ranks_serves_the_single_process_video(start_server, make_client):
    import httpx
    import psutil

    from media.video import read_video
    from microverse.tools.service_process import process_tree

    server = start_server(MICROVERSE_CONTEXT_PARALLEL=2, MICROVERSE_DEVICE="cpu")
    tree = process_tree(server.proc.pid)
    assert any("spawn_main" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]  # rank 1
    response = httpx.post(server.url + "/generate", json=BODY, timeout=120)
    assert response.status_code == 200, response.text
    ref = make_client(device="cpu").post("/generate", json=BODY).content
    assert max_diff(read_video(response.content)[0], read_video(ref)[0]) <= 2
    server.proc.terminate()  # a SIGTERM to the server alone: nothing but the service's own shutdown ends the ranks
    server.proc.wait(60)
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    log = server.log_path.read_text()
    assert "is gone; this rank exits" not in log and "did not stop" not in log  # rank 0 stopped rank 1 itself


def test_cli_generate_with_two_ranks_writes_the_single_process_clip(tiny_model_dir, tmp_path):
    from media.video import encode_mp4, read_video
    from microverse.config import Settings
    from microverse.engine import DiffusersEngine

    out = tmp_path / "clip.mp4"
    flags = {"--height": 32, "--width": 32, "--num-frames": 5, "--steps": 3, "--guidance-scale": 5.0, "--seed": 5,
             "--fps": 8, "--negative-prompt": "", "--model": tiny_model_dir, "--device": "cpu",
             "--storage-dir": tmp_path / "s", "--context-parallel": 2, "-o": out}
    proc = subprocess.run([sys.executable, "-m", "microverse.cli", "generate", BODY["prompt"],
                           *(str(x) for kv in flags.items() for x in kv)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context parallel: the 1 other rank(s) stopped" in proc.stderr
    single = DiffusersEngine.from_settings(Settings(model=str(tiny_model_dir), device="cpu", storage_dir=tmp_path))
    ref = encode_mp4(single.generate([GenerationSpec(**BODY)]).videos[0], BODY["fps"])
    assert max_diff(read_video(out)[0], read_video(ref)[0]) <= 2


def run_two_rank_experts(model_dir: str, out: str) -> None:
    """Rank 0 of a two-rank group on a Wan2.2 A14B layout (two experts)."""
    from microverse.config import Settings
    from microverse.parallel import build_engine

    engine = build_engine(Settings(model=model_dir, device="cpu", storage_dir=out + ".s", context_parallel=2))
    try:
        pipe = engine.model.pipe
        torch.save({"latents": engine.generate([GenerationSpec(**BODY)]).latents,
                    "split": [t._parallel_config is not None for t in (pipe.transformer, pipe.transformer_2)]}, out)
    finally:
        engine.close()


def test_both_experts_of_a14b_are_split(tmp_path):
    from microverse.config import Settings
    from microverse.engine import DiffusersEngine
    from microverse.tools.tiny import TinyWanConfig, save_tiny_pipeline

    model_dir = str(save_tiny_pipeline(tmp_path / "a14b", TinyWanConfig(family="wan2.2-t2v-a14b")))
    out = str(tmp_path / "experts.pt")
    code = f"from tests.test_parallel import run_two_rank_experts; run_two_rank_experts({model_dir!r}, {out!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["split"] == [True, True]
    single = DiffusersEngine.from_settings(Settings(model=model_dir, device="cpu", storage_dir=tmp_path / "s"))
    ref = single.generate([GenerationSpec(**BODY)]).latents
    assert float((got["latents"] - ref).norm() / ref.norm()) < 1e-5
