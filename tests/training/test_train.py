"""Tiny CPU training runs: loss falls (LoRA and full), exact resume after SIGKILL, exports load."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_test_media import debug_config

from training.config import load_config
from training.dataset import encoder_key
from training.trainer import latest_checkpoint, train

REPO = Path(__file__).resolve().parents[2]


def _losses(out: Path) -> np.ndarray:
    return np.array([float(r["loss"]) for r in csv.DictReader((out / "loss.csv").read_text().splitlines())])


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_overfit_loss_falls(run, request):
    out = request.getfixturevalue(run)
    loss = _losses(out)
    assert len(loss) == 200 and np.isfinite(loss).all()
    first, last = loss[:50].mean(), loss[-50:].mean()
    print(f"{run}: mean loss steps 1-50 {first:.4f} -> 151-200 {last:.4f}")
    assert last < 0.7 * first
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    norms = np.array([float(r["grad_norm"]) for r in csv.DictReader((out / "loss.csv").read_text().splitlines())])
    assert len(norms) == 200 and np.isfinite(norms).all()
    # Zero only where the loss is: the bell weighting gives the schedule's end sigma weight 0.
    assert ((norms > 0) | (loss == 0)).all() and (norms > 0).mean() > 0.95
    if run == "lora_run":
        assert norms.max() > 1  # measured before clipping, which caps the applied norm at 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000100", "step-0000200"]


def test_lora_checkpoint_layout_and_validation(lora_run):
    ckpt = lora_run / "checkpoints" / "step-0000200"
    for name in (
        "trainable.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "trainer_state_0.pt",
        "export/pytorch_lora_weights.safetensors",
    ):
        assert (ckpt / name).exists(), name
    trainable = load_file(str(ckpt / "trainable.safetensors"))
    assert trainable and all("lora_" in k for k in trainable)  # the frozen base is not duplicated
    info = json.loads((lora_run / "final" / "microverse_checkpoint.json").read_text())
    assert info["kind"] == "lora" and info["step"] == 200 and info["lora_rank"] == 8
    upstream = load_file(str(lora_run / "final" / "step-200.safetensors"))
    assert (
        "blocks.0.self_attn.q.lora_A.default.weight" in upstream and "blocks.1.ffn.2.lora_B.default.weight" in upstream
    )
    assert len(upstream) == 2 * 2 * 2 * 4 + 2 * 2 * 2  # 2 blocks x (2 attn x 4 proj + 2 ffn) x (A, B)
    videos = sorted((lora_run / "validation").rglob("*.mp4"))
    assert [v.parent.name for v in videos] == ["step-0000100", "step-0000200"]


def test_lora_export_reproduces_trained_model(lora_run, tiny_model):
    """The diffusers LoRA file, loaded with ``load_lora_weights``, gives the trained transformer's
    output (alpha/rank = 2 is folded into lora_B)."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig

    trained = WanTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer")
    cfg = load_config(str(lora_run / "config.yaml"))
    trained.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg.model.lora_targets)))
    trained.load_state_dict(
        load_file(str(lora_run / "final" / "../checkpoints/step-0000200/trainable.safetensors")), strict=False
    )
    pipe = WanPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(lora_run / "final")
    base = WanTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer")
    torch.manual_seed(0)
    x, t, text = torch.randn(1, 4, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        want, got = trained(x, t, text, return_dict=False)[0], pipe.transformer(x, t, text, return_dict=False)[0]
        before = base(x, t, text, return_dict=False)[0]
    assert torch.allclose(want, got, atol=1e-5)
    assert (want - before).abs().max() > 1e-3


def test_full_export_formats(full_run, tiny_model, tmp_path):
    from diffusers import WanTransformer3DModel

    from training.convert import convert_checkpoint

    final = WanTransformer3DModel.from_pretrained(full_run / "final" / "transformer")
    base = WanTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer")
    assert any(
        (a - b).abs().max() > 0 for a, b in zip(final.state_dict().values(), base.state_dict().values(), strict=True)
    )
    upstream = load_file(str(full_run / "final" / "step-200.safetensors"))
    assert "blocks.0.self_attn.q.weight" in upstream and "head.head.weight" in upstream
    back = convert_checkpoint(
        full_run / "final" / "step-200.safetensors", tmp_path / "back", to="diffusers", base=str(tiny_model)
    )
    restored = WanTransformer3DModel.from_pretrained(back).state_dict()
    assert all(torch.equal(v, restored[k]) for k, v in final.state_dict().items())


def test_resume_after_sigkill_is_bitwise(tmp_path, tiny_model, tiny_dataset):
    """Reference: 40 uninterrupted steps. Same config in a subprocess, SIGKILLed right after its
    first checkpoint, then resumed: the final weights, EMA, optimizer state and loss history match
    bit for bit (CPU kernels are deterministic at a fixed thread count)."""
    fields = dict(
        max_steps=40, checkpoint_every=5, validation_prompts=(), grad_accum=2, ema_decay=0.9,
        optim__schedule="cosine", optim__warmup_steps=4, data__caption_dropout=0.5,
    )  # fmt: skip
    ref = debug_config(tmp_path / "ref", tiny_model, tiny_dataset, **fields)
    train(ref)

    killed = debug_config(tmp_path / "killed", tiny_model, tiny_dataset, **fields)
    killed.output_dir = str(tmp_path / "killed")
    from training.config import save_config

    save_config(killed, tmp_path / "killed.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "--config", str(tmp_path / "killed.yaml")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while latest_checkpoint(tmp_path / "killed") is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed_from = latest_checkpoint(tmp_path / "killed")
    assert resumed_from is not None and not (tmp_path / "killed" / "final").exists()
    print(f"killed after checkpoint {resumed_from.name}")

    train(killed)
    a = tmp_path / "ref" / "checkpoints" / "step-0000040"
    b = tmp_path / "killed" / "checkpoints" / "step-0000040"
    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = (
        load_file(str(a / "export/pytorch_lora_weights.safetensors")),
        load_file(str(b / "export/pytorch_lora_weights.safetensors")),
    )
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # EMA weights
    oa, ob = torch.load(a / "optimizer.bin", weights_only=True), torch.load(b / "optimizer.bin", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    assert np.array_equal(_losses(tmp_path / "ref"), _losses(tmp_path / "killed"))
    assert len(_losses(tmp_path / "killed")) == 40


def tiny_dataset_batches(dataset) -> list:
    """The single-process batches of epoch 0 of the debug config on ``dataset``."""
    from training.dataset import BucketBatchSampler, build_samples

    cfg = debug_config(Path("unused"), Path("unused"), dataset)
    samples = build_samples(dataset, cfg.data.buckets, Path("unused"), "key", 32)
    return list(BucketBatchSampler(samples, cfg.batch_size, cfg.seed, 0, 1, repeat=cfg.data.repeat))


def test_two_process_gloo_run(tmp_path, tiny_model, tiny_dataset, caplog):
    """Two gloo processes on CPU train and write the single-process checkpoint format.

    accelerate 1.15's ``--cpu --num_processes 2`` expects mpirun; torchrun-based ``--multi_gpu``
    with ``ACCELERATE_USE_CPU=true`` gives the same two-process gloo (MULTI_CPU) run."""
    cfg = debug_config(
        tmp_path / "ddp", tiny_model, tiny_dataset, max_steps=4, checkpoint_every=2, validation_prompts=()
    )
    from training.config import save_config

    save_config(cfg, tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.cli", "train", "--config", str(tmp_path / "ddp.yaml")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[result.stderr.find("Traceback") :][:4000]
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-0000004"
    for name in ("trainable.safetensors", "optimizer.bin", "trainer_state_0.pt", "trainer_state_1.pt",
                 "random_states_1.pkl", "export/pytorch_lora_weights.safetensors",
                 "export/microverse_checkpoint.json"):  # fmt: skip
        assert (ckpt / name).exists(), name
    ranks = [torch.load(ckpt / f"trainer_state_{r}.pt", weights_only=True) for r in (0, 1)]
    assert [s["step"] for s in ranks] == [4, 4]
    assert len(_losses(tmp_path / "ddp")) == 4
    lora = load_file(str(tmp_path / "ddp" / "final" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in lora)

    # The 2-process run resumes on 1 process: from its global batch position, with a warning saying what changed.
    assert [s["world_size"] for s in ranks] == [2, 2]
    more = debug_config(tmp_path / "ddp", tiny_model, tiny_dataset, max_steps=6, checkpoint_every=2,
                        validation_prompts=())  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        train(more)
    assert "resuming a 2-process checkpoint on 1 processes" in caplog.text
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-0000006" / "trainer_state_0.pt", weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 1
    batches_per_epoch = len(tiny_dataset_batches(tiny_dataset))
    assert state["epoch"] * batches_per_epoch + state["position"] == 4 * 2 + 2 * 1
    assert len(_losses(tmp_path / "ddp")) == 6


def test_gradient_checkpointing_and_bf16_autocast(tmp_path, tiny_model, tiny_dataset):
    """Gradient checkpointing leaves a LoRA run unchanged; bf16 autocast keeps fp32 master weights."""
    runs = {}
    for name, fields in {"plain": {}, "ckpt": {"model__gradient_checkpointing": True}}.items():
        cfg = debug_config(
            tmp_path / name, tiny_model, tiny_dataset, max_steps=6, checkpoint_every=6, validation_prompts=(), **fields
        )
        train(cfg)
        runs[name] = load_file(str(tmp_path / name / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    assert all(torch.allclose(runs["plain"][k], runs["ckpt"][k], atol=1e-6) for k in runs["plain"])

    from accelerate.state import AcceleratorState

    from training.trainer import Trainer

    cfg = debug_config(tmp_path / "bf16", tiny_model, tiny_dataset, mode="full", max_steps=3, checkpoint_every=3,
                       validation_prompts=(), mixed_precision="bf16")  # fmt: skip
    AcceleratorState._reset_state()  # accelerate keeps one precision per process; this test switches it
    try:
        trainer = Trainer(cfg)
        trainer.train()
    finally:
        AcceleratorState._reset_state()
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert np.isfinite(_losses(tmp_path / "bf16")).all()
    state = load_file(str(tmp_path / "bf16" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())


def test_encoder_key_follows_the_folder_not_how_it_is_named(tmp_path, monkeypatch):
    """Cached latents survive a relative/absolute path change and are rebuilt when the VAE is."""
    for sub in ("vae", "text_encoder"):
        (tmp_path / "m" / sub).mkdir(parents=True)
        (tmp_path / "m" / sub / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    key = encoder_key("m")
    assert encoder_key(tmp_path / "m") == key
    weights = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"new weights")
    assert encoder_key("m") != key
    assert encoder_key("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_batched_latent_cache_matches_one_by_one(tmp_path, tiny_model, tiny_dataset):
    """``data.cache_batch_size`` encodes several clips per VAE call; the cached latents are the same."""
    from training.trainer import Trainer

    caches = {}
    for batch in (1, 3):
        cfg = debug_config(tmp_path / f"b{batch}", tiny_model, tiny_dataset, max_steps=1, validation_prompts=(),
                           data__cache_batch_size=batch)  # fmt: skip
        trainer = Trainer(cfg)
        caches[batch] = {s.id: load_file(str(s.cache_file)) for s in trainer.samples}
    assert len(caches[1]) == len(caches[3]) == 4
    for clip, one in caches[1].items():
        torch.testing.assert_close(caches[3][clip]["latents"], one["latents"], atol=1e-5, rtol=1e-4)
        assert torch.equal(caches[3][clip]["prompt_embeds"], one["prompt_embeds"])


def test_exports_default_to_bf16_at_chosen_steps_and_load_in_the_service(tmp_path, tiny_model, tiny_dataset):
    """``export_dtype`` defaults to bf16 (half of fp32's size); ``export_every`` picks the checkpoints that get one."""
    from training.config import TrainConfig

    assert TrainConfig().export_dtype == "bfloat16"
    out = tmp_path / "bf16"
    cfg = debug_config(out, tiny_model, tiny_dataset, mode="full", max_steps=4, checkpoint_every=2, export_every=4,
                       validation_prompts=(), export_dtype="bfloat16")  # fmt: skip
    train(cfg)
    assert not (out / "checkpoints" / "step-0000002" / "export").exists()
    assert (out / "checkpoints" / "step-0000004" / "export" / "transformer").is_dir()
    weights = load_file(str(next((out / "final" / "transformer").glob("*.safetensors"))))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "final" / "microverse_checkpoint.json").read_text())["dtype"] == "bfloat16"

    from microverse import config, loading

    pipe = loading.load_pipeline(config.Settings(model=str(tiny_model), transformer=str(out / "final" / "transformer")))
    video = pipe.pipe(prompt="cells dividing", height=32, width=32, num_frames=9, num_inference_steps=2,
                      output_type="np").frames[0]  # fmt: skip
    assert video.shape == (9, 32, 32, 3) and np.isfinite(video).all()


def test_comfyui_lora_export_gives_the_same_video(tmp_path, tiny_model, tiny_dataset):
    """``write_comfyui``: the kohya / musubi-tuner layout ComfyUI loads; read back by diffusers' own converter it
    gives the same video as the diffusers-format export."""
    from diffusers import WanPipeline

    out = tmp_path / "comfy"
    cfg = debug_config(out, tiny_model, tiny_dataset, max_steps=3, checkpoint_every=3, validation_prompts=(),
                       write_comfyui=True, model__lora_rank=4, model__lora_alpha=8, optim__lr=5e-2)  # fmt: skip
    train(cfg)
    comfy = load_file(str(out / "final" / "comfyui_lora.safetensors"))
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in comfy and "lora_unet_blocks_1_ffn_2.alpha" in comfy
    assert float(comfy["lora_unet_blocks_0_cross_attn_o.alpha"]) == 8.0

    def video(lora_file: Path | None) -> np.ndarray:
        pipe = WanPipeline.from_pretrained(tiny_model)
        if lora_file is not None:
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="cells dividing", height=32, width=32, num_frames=9, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").frames[0]  # fmt: skip

    base = video(None)
    diffusers_video = video(out / "final" / "pytorch_lora_weights.safetensors")
    comfy_video = video(out / "final" / "comfyui_lora.safetensors")
    assert np.abs(diffusers_video - base).max() > 1e-3
    np.testing.assert_allclose(comfy_video, diffusers_video, atol=1e-5)


def test_weighted_datasets_buckets_from_the_data_and_a_validation_timeout(tmp_path, tiny_model, tiny_dataset, caplog):
    """``data.datasets`` mixes sets by weight, ``data.bucket_area`` takes the bucket shapes from the clips, and
    ``validation_timeout`` stops the renders (on every rank alike) instead of stalling training."""
    from training_test_media import blobs

    from media.video import write_mp4
    from training.trainer import Trainer

    extra = tmp_path / "wide"
    for i in range(2):
        write_mp4(extra / f"w{i}.mp4", blobs(9, (32, 64), seed=20 + i, background=90), fps=16)
    rows = [{"video": f"w{i}.mp4", "prompt": "cells dividing"} for i in (0, 1)]
    (extra / "metadata.json").write_text(json.dumps(rows))
    cfg = debug_config(tmp_path / "mix", tiny_model, tiny_dataset, max_steps=1, validation_timeout=0.0,
                       data__datasets={str(extra): 3}, data__bucket_area=32 * 32)  # fmt: skip
    trainer = Trainer(cfg)
    assert sorted({s.bucket for s in trainer.samples}) == [(9, 16, 48), (9, 32, 32)]  # square and 2:1 at ~1024 px
    assert sorted(s.repeat for s in trainer.samples) == [1, 1, 1, 1, 3, 3]
    assert len(trainer.sampler.batches(0)) == 4 + 2 * 3  # batch size 1: each wide clip three times per epoch
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        assert trainer.validate() == []
    assert "validation stopped after 0 of 1 renders per rank" in caplog.text
