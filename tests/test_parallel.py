"""Context parallelism on CPU with gloo: the split transformer forward and the two-rank engine equal one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microverse.parallel import layout_for

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
