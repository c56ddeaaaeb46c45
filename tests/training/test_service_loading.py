"""Exported checkpoints load in the service (``microverse.loading.load_pipeline``) and change its output."""

from __future__ import annotations

import numpy as np

from microverse import config, loading


def _generate(tiny_model, **settings) -> np.ndarray:
    import torch

    pipe = loading.load_pipeline(config.Settings(model=str(tiny_model), **settings)).pipe
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="cells dividing", height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    return out.frames[0]


def test_exports_load_in_service_and_change_output(tiny_model, lora_run, full_run, tmp_path):
    from training.export import export_checkpoint

    base = _generate(tiny_model)
    lora = _generate(tiny_model, lora=[str(lora_run / "final")])
    lora_upstream = _generate(tiny_model, lora=[str(lora_run / "final" / "step-200.safetensors")])
    full = _generate(tiny_model, transformer=str(full_run / "final" / "transformer"))
    full_upstream = _generate(tiny_model, transformer=str(export_checkpoint(full_run, tmp_path / "up", fmt="upstream")))
    for name, video in {"lora": lora, "full": full}.items():
        diff = np.abs(video - base).max()
        print(f"{name}: max |fine-tuned - base| = {diff:.4f}")
        assert diff > 1e-2, name
    # The upstream-format copies give the same video as the diffusers-format exports.
    assert np.abs(lora_upstream - lora).max() < 1e-5
    assert np.abs(full_upstream - full).max() < 1e-5
