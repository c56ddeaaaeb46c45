"""Checkpoints: a saved diffusers folder, upstream and diffusers LoRAs, full DiTs, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from microverse.config import Settings
from microverse.engine import DiffusersEngine
from microverse.loading import CheckpointError, load_pipeline
from microverse.schemas import GenerationSpec

SPEC = GenerationSpec(prompt="a cell divides into two daughter cells", negative_prompt="", height=32, width=32,
                      num_frames=5, num_inference_steps=3, guidance_scale=5.0, seed=7, fps=8)
TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def frames(settings: Settings) -> np.ndarray:
    return DiffusersEngine.from_settings(settings).generate([SPEC]).videos[0]


def upstream_lora(transformer, rank=4, seed=0) -> dict[str, torch.Tensor]:
    """A LoRA in the upstream MicroVerse layout: original Wan names with PEFT '.default' suffixes."""
    from tests.test_lora_formats import WAN_TO_DIFFUSERS

    g = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    sd = {}
    for i in range(transformer.config.num_layers):
        for t in TARGETS:
            lin = modules[f"blocks.{i}.{WAN_TO_DIFFUSERS[t]}"]
            sd[f"blocks.{i}.{t}.lora_A.default.weight"] = torch.randn(rank, lin.in_features, generator=g)
            sd[f"blocks.{i}.{t}.lora_B.default.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.5
    return sd


@pytest.fixture(scope="module")
def base_frames(tiny_model_dir, tmp_path_factory):
    return frames(Settings(model=str(tiny_model_dir), storage_dir=tmp_path_factory.mktemp("s")))


def test_saved_checkpoint_loads_through_settings(tiny_model_dir, base_frames, monkeypatch, tmp_path):
    monkeypatch.setenv("MICROVERSE_MODEL", str(tiny_model_dir))
    settings = Settings(storage_dir=tmp_path)
    assert settings.model == str(tiny_model_dir)
    loaded = load_pipeline(settings)
    assert loaded.source == str(tiny_model_dir)
    assert loaded.defaults.height == 64 and loaded.defaults.max_sequence_length == 32
    np.testing.assert_array_equal(frames(settings), base_frames)


def test_upstream_lora_loads_and_changes_output(tiny_model_dir, base_frames, tmp_path):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer")
    path = tmp_path / "step-100.safetensors"
    save_file(upstream_lora(transformer), str(path))
    settings = Settings(model=str(tiny_model_dir), lora=str(path), storage_dir=tmp_path)
    assert settings.lora == [str(path)]
    loaded = load_pipeline(settings)
    assert loaded.loras == [str(path)]
    lora_layers = [n for n, _ in loaded.pipe.transformer.named_modules() if n.endswith("lora_A")]
    assert len(lora_layers) == transformer.config.num_layers * len(TARGETS)
    out = frames(settings)
    assert np.abs(out.astype(int) - base_frames).mean() > 1.0


def test_lora_scale_zero_is_the_base_model(tiny_model_dir, base_frames, tmp_path):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer")
    path = tmp_path / "step-1.safetensors"
    save_file(upstream_lora(transformer), str(path))
    out = frames(Settings(model=str(tiny_model_dir), lora=str(path), lora_scale=0.0, storage_dir=tmp_path))
    assert np.abs(out.astype(int) - base_frames).max() <= 1


def test_diffusers_lora_folder_loads(tiny_model_dir, base_frames, tmp_path):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = WanPipeline.from_pretrained(tiny_model_dir)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora_layers = get_peft_model_state_dict(pipe.transformer)
    WanPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=lora_layers)
    out = frames(Settings(model=str(tiny_model_dir), lora=str(tmp_path / "lora"), storage_dir=tmp_path))
    assert np.abs(out.astype(int) - base_frames).mean() > 1.0


def test_foreign_lora_keys_stop_loading_and_are_named(tiny_model_dir, tmp_path):
    path = tmp_path / "sd-unet-lora.safetensors"
    save_file({"down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 320),
               "down_blocks.0.attentions.0.to_q.lora_B.weight": torch.zeros(320, 4)}, str(path))
    with pytest.raises(CheckpointError, match=r"down_blocks\.0\.attentions\.0\.to_q"):
        load_pipeline(Settings(model=str(tiny_model_dir), lora=str(path), storage_dir=tmp_path))


def test_wrong_shape_lora_is_named(tiny_model_dir, tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, 999),
               "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(32, 4)}, str(path))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn1\.to_q\.lora_A.*in_features 999"):
        load_pipeline(Settings(model=str(tiny_model_dir), lora=str(path), storage_dir=tmp_path))


def test_non_lora_file_is_rejected(tiny_model_dir, tmp_path):
    path = tmp_path / "junk.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"not LoRA weights: some\.weight"):
        load_pipeline(Settings(model=str(tiny_model_dir), lora=str(path), storage_dir=tmp_path))


def test_full_transformer_folder_replaces_the_dit(tiny_model_dir, base_frames, tmp_path):
    from diffusers import WanTransformer3DModel

    t = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer")
    with torch.no_grad():
        t.proj_out.weight.mul_(-1.0)
    t.save_pretrained(tmp_path / "ft")
    settings = Settings(model=str(tiny_model_dir), transformer=str(tmp_path / "ft"), storage_dir=tmp_path)
    assert load_pipeline(settings).transformer_override == str(tmp_path / "ft")
    assert np.abs(frames(settings).astype(int) - base_frames).mean() > 1.0


def test_dit_with_foreign_keys_is_rejected_naming_them(tiny_model_dir, tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({"model.unknown_layer.weight": torch.zeros(2), "blocks.0.self_attn.q.weight": torch.zeros(32, 32)},
              str(path))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.unknown_layer\.weight"):
        load_pipeline(Settings(model=str(tiny_model_dir), transformer=str(path), storage_dir=tmp_path))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pipeline(Settings(model=str(tmp_path / "nope"), storage_dir=tmp_path))


def test_bad_lora_stops_the_service_model_with_the_reason(make_client, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(4, 8), "unet.x.lora_B.weight": torch.zeros(8, 4)}, str(path))
    client = make_client(lora=str(path))
    info = client.get("/info").json()
    assert info["ready"] is False and "unet.x" in info["load_error"]
    resp = client.post("/generate", json={"prompt": "a cell"})
    assert resp.status_code == 503 and "unet.x" in resp.json()["error"]["message"]


def test_cli_generate_with_bad_lora_fails_naming_keys(tiny_model_dir, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"unet.y.lora_A.weight": torch.zeros(4, 8), "unet.y.lora_B.weight": torch.zeros(8, 4)}, str(path))
    proc = subprocess.run([sys.executable, "-m", "microverse.cli", "generate", "a cell", "-o", str(tmp_path / "o.mp4"),
                           "--model", str(tiny_model_dir), "--lora", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "unet.y" in proc.stderr
