"""CUDA-facing choices (device, dtype, attention kernels, torchao, compile, offload, tiling) on CPU."""

import logging

import numpy as np
import pytest
import torch

from microverse import optimize
from microverse.config import Settings
from microverse.engine import DiffusersEngine
from microverse.optimize import ConfigError, choose_attention, quantization_config, resolve_device, resolve_dtype
from microverse.schemas import GenerationSpec

SPEC = GenerationSpec(prompt="a cell divides", negative_prompt="", height=32, width=32, num_frames=5,
                      num_inference_steps=2, guidance_scale=5.0, seed=0, fps=8)


def test_device_and_dtype_resolution():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("backend", ["cudnn", "flash", "flash3", "sage", "xformers"])
def test_explicit_gpu_attention_on_cpu_fails_clearly(backend):
    with pytest.raises(ConfigError, match=rf"MICROVERSE_ATTENTION_BACKEND={backend} is not available: .*CUDA"):
        choose_attention(backend, "cpu")


def test_auto_attention_picks_and_explains(monkeypatch):
    assert choose_attention("auto", "cpu") == ("native", "CPU: PyTorch SDPA is the only attention kernel")
    monkeypatch.setattr(optimize, "attention_available", lambda name, device: (name == "flash3", "x"))
    name, reason = choose_attention("auto", "cuda")
    assert name == "flash3" and "FlashAttention-3" in reason
    monkeypatch.setattr(optimize, "attention_available", lambda name, device: (name == "native", "x"))
    assert choose_attention("auto", "cuda")[0] == "native"


def test_unavailable_package_message_names_it(monkeypatch):
    from diffusers.models import attention_dispatch as ad

    monkeypatch.setattr(ad, "_CAN_USE_SAGE_ATTN", False)
    ok, why = optimize.attention_available("sage", "cuda")
    assert not ok and "sageattention" in why


def test_settings_reject_unknown_choices():
    with pytest.raises(ValueError, match="attention_backend"):
        Settings(attention_backend="magic")
    with pytest.raises(ValueError, match="quantization"):
        Settings(quantization="int4")


def test_torchao_configs(tiny_model_dir, tmp_path):
    from diffusers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig

    assert quantization_config(Settings(quantization="none"), "cpu") is None
    cfg = quantization_config(Settings(quantization="int8wo"), "cpu")
    assert isinstance(cfg, PipelineQuantizationConfig)
    assert isinstance(cfg.quant_mapping["transformer"].quant_type, Int8WeightOnlyConfig)
    with pytest.raises(ConfigError, match="fp8 needs a CUDA GPU"):
        quantization_config(Settings(quantization="fp8"), "cpu")


def test_int8_weight_only_runs_on_cpu_and_stays_close(tiny_model_dir, tmp_path):
    base = DiffusersEngine.from_settings(Settings(model=str(tiny_model_dir), storage_dir=tmp_path))
    quant = DiffusersEngine.from_settings(Settings(model=str(tiny_model_dir), storage_dir=tmp_path,
                                                   quantization="int8wo"))
    assert quant.choice.quantization == "int8wo"
    weight = quant.model.pipe.transformer.blocks[0].attn1.to_q.weight
    assert "AffineQuantized" in type(weight).__name__ or "Int8" in type(weight).__name__
    a, b = base.generate([SPEC]).videos[0], quant.generate([SPEC]).videos[0]
    assert np.abs(a.astype(int) - b).mean() < 10


def test_offload_tiling_and_compile_are_applied_or_explained(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from diffusers import WanTransformer3DModel

    calls = []
    monkeypatch.setattr(WanTransformer3DModel, "compile_repeated_blocks",
                        lambda self, **kw: calls.append(kw), raising=False)
    with caplog.at_level(logging.WARNING):
        engine = DiffusersEngine.from_settings(Settings(model=str(tiny_model_dir), storage_dir=tmp_path,
                                                        offload="model", vae_tiling=True, compile=True))
    assert engine.choice.offload == "none" and "only applies on CUDA" in caplog.text
    assert engine.model.pipe.vae.use_tiling is True
    assert calls == [{"fullgraph": True}] and engine.choice.compiled


def test_unavailable_backend_keeps_service_unready_with_reason(make_client):
    info = make_client(attention_backend="flash").get("/info").json()
    assert info["ready"] is False and "MICROVERSE_ATTENTION_BACKEND=flash" in info["load_error"]
