"""Sharded training (FSDP2 through accelerate) on 2 gloo ranks equals single-process training of the same global batch.

The launch uses the shipped 8-GPU config ``training/accelerate/fsdp2.yaml`` with ``--num_processes 2`` on CPU. One
process accumulating 2 micro-batches takes the same global batches, noise and timesteps per step as 2 ranks of one
micro-batch each (the noise is keyed on the global batch, not the rank), so losses, gradient norms and the exported
weights must agree to float tolerance.

DeepSpeed is not run here: it needs CUDA (its ZeRO optimizers are CUDA extensions) and is not installed on the CPU
test machine; the trainer follows accelerate's DeepSpeed contract (one ``prepare`` of model, optimizer, loader and
schedule, accumulation owned by the Accelerator) but that path is untested.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_test_media import debug_config

from training.config import save_config
from training.trainer import train

REPO = Path(__file__).resolve().parents[2]
FSDP2 = REPO / "training" / "accelerate" / "fsdp2.yaml"


def _history(out: Path) -> np.ndarray:
    rows = list(csv.DictReader((out / "loss.csv").read_text().splitlines()))
    return np.array([[float(r["loss"]), float(r["grad_norm"])] for r in rows])


def _launch_fsdp2(cfg, tmp_path: Path) -> None:
    """``accelerate launch`` of ``cfg`` on 2 CPU processes with the shipped FSDP2 config."""
    path = tmp_path / f"{Path(cfg.output_dir).name}.yaml"
    save_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
           "--mixed_precision", "no", "-m", "training.cli", "train", "--config", str(path)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[result.stderr.find("Traceback") :][:4000]


def _exported(out: Path, mode: str) -> dict[str, torch.Tensor]:
    if mode == "lora":
        return load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    files = sorted((out / "final" / "transformer").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _assert_same_run(a: Path, b: Path, mode: str, lr: float) -> None:
    """Same losses and gradient norms to 1e-4; same weights to float tolerance under Adam: most tensors to 1e-6, and
    every one within a tenth of the learning rate, because Adam divides a gradient by its own running scale, so a
    weight whose gradient is at float-noise level (cross-attention keys of zero-padded text) takes steps of up to
    the learning rate on that noise."""
    np.testing.assert_allclose(_history(a), _history(b), rtol=1e-4, atol=1e-6)
    val_a, val_b = (np.loadtxt(out / "val_loss.csv", delimiter=",", skiprows=1) for out in (a, b))
    assert val_a.shape == (3, 7)  # steps 0, 2, 4: the mean and 5 noise levels, split over the ranks when sharded
    np.testing.assert_allclose(val_a, val_b, rtol=1e-4)
    wa, wb = _exported(a, mode), _exported(b, mode)
    assert wa.keys() == wb.keys() and wa
    diffs = {key: (wa[key] - wb[key]).abs().max().item() for key in wa}
    assert max(diffs.values()) < lr / 10, max(diffs.items(), key=lambda kv: kv[1])
    assert float(np.median(list(diffs.values()))) < 1e-6


@pytest.mark.parametrize(("mode", "fields"), [("lora", {"ema_decay": 0.9}), ("full", {})])
def test_fsdp2_two_ranks_match_single_process(tmp_path, tiny_model, tiny_dataset, mode, fields):
    """Loss curve, gradient norms, held-out losses and exported weights of a 2-rank FSDP2 run equal one process with 2
    micro-batches per step; the checkpoint holds each rank's shards of the trainable state only; it resumes on 1
    process."""
    common = dict(max_steps=4, checkpoint_every=2, optim__lr=5e-3, validation_loss_every=2, validation_every=4,
                  validation_prompts=("cells dividing", "blood flowing in a vessel", "bacteria swimming toward source"),
                  data__validation_dataset=str(tiny_dataset), **fields)  # fmt: skip
    single = debug_config(tmp_path / "single", tiny_model, tiny_dataset, mode=mode, grad_accum=2, **common)
    train(single)
    sharded = debug_config(tmp_path / "fsdp2", tiny_model, tiny_dataset, mode=mode, grad_accum=1, **common)
    _launch_fsdp2(sharded, tmp_path)
    _assert_same_run(tmp_path / "single", tmp_path / "fsdp2", mode, lr=5e-3)

    ckpt = tmp_path / "fsdp2" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    trainable = load_file(str(tmp_path / "single" / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert sorted(k.removeprefix("model.") for k in weights) == sorted(trainable)  # no frozen base under LoRA
    assert any(k.startswith("ema.") for k in saved) == ("ema_decay" in fields)

    # Validation videos: the 3 prompts dealt to the 2 ranks (one renders a discarded pad), as one process renders them.
    for run in ("single", "fsdp2"):
        videos = sorted((tmp_path / run / "validation" / "step-0000004").glob("*.mp4"))
        assert [v.name for v in videos] == ["00.mp4", "01.mp4", "02.mp4"], run
    from media.video import read_video

    for name in ("00.mp4", "02.mp4"):
        one, two = (read_video(tmp_path / run / "validation" / "step-0000004" / name)[0] for run in ("single", "fsdp2"))
        assert one.shape == two.shape == (9, 32, 32, 3) and np.abs(one.astype(int) - two.astype(int)).mean() < 2

    # The 2-rank checkpoint at step 2 resumes on one process (2 micro-batches per step) to the same end.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    shutil.rmtree(resumed / "final")
    train(debug_config(resumed, tiny_model, tiny_dataset, mode=mode, grad_accum=2, **common))
    _assert_same_run(tmp_path / "single", resumed, mode, lr=5e-3)
