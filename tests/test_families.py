"""Wan model families (issue 18, item 1): told apart by model_index.json, loaded with their diffusers pipeline,
generated from through the engine and the service, named in /info and GET /v1/models (the image-conditioned
families: ``tests/test_image_input.py``)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from microverse.config import Settings
from microverse.engine import DiffusersEngine
from microverse.families import FAMILIES, UnknownFamilyError, detect_family
from microverse.loading import CheckpointError, load_pipeline
from microverse.schemas import GenerationSpec
from microverse.tools.tiny import TinyWanConfig, save_tiny_pipeline

T2V = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
       "transformer_2": [None, None], "boundary_ratio": None, "expand_timesteps": False}  # fmt: skip


@pytest.mark.parametrize(("index", "family"), [
    (T2V, "wan2.1-t2v"),
    ({**T2V, "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}, "wan2.2-t2v-a14b"),
    ({**T2V, "expand_timesteps": True}, "wan2.2-ti2v"),
    ({**T2V, "_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModel"]},
     "wan2.1-i2v"),
    ({**T2V, "_class_name": "WanImageToVideoPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"],
      "image_encoder": [None, None]}, "wan2.2-i2v-a14b"),
])  # fmt: skip
def test_the_family_comes_from_model_index(index, family):
    assert detect_family(index) is FAMILIES[family]


def test_an_unknown_pipeline_is_named():
    with pytest.raises(UnknownFamilyError, match="'FluxPipeline'"):
        detect_family({"_class_name": "FluxPipeline"})


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny_pipeline(root / f, TinyWanConfig(family=f)) for f in ("wan2.2-t2v-a14b", "wan2.2-ti2v")}


def _spec(**kw) -> GenerationSpec:
    base = dict(prompt="a cell divides", negative_prompt="", height=64, width=64, num_frames=9, num_inference_steps=4,
                guidance_scale=5.0, seed=0, fps=8)  # fmt: skip
    return GenerationSpec(**{**base, **kw})


def test_a14b_loads_both_experts_and_each_denoises_its_share_of_the_steps(family_models):
    engine = DiffusersEngine.from_settings(Settings(model=str(family_models["wan2.2-t2v-a14b"])))
    pipe = engine.model.pipe
    assert engine.model.family.name == "wan2.2-t2v-a14b" and pipe.transformer_2 is not None
    calls = {"high": 0, "low": 0}
    pipe.transformer.register_forward_hook(lambda *_: calls.__setitem__("high", calls["high"] + 1))
    pipe.transformer_2.register_forward_hook(lambda *_: calls.__setitem__("low", calls["low"] + 1))
    out = engine.generate([_spec(), _spec(seed=1)])
    assert [v.shape for v in out.videos] == [(9, 64, 64, 3)] * 2
    # 4 steps with CFG (2 forwards each): the high-noise expert takes the steps at t >= 875, the low-noise one the rest.
    timesteps = pipe.scheduler.timesteps
    high = int((timesteps >= 0.875 * 1000).sum())
    assert calls == {"high": 2 * high, "low": 2 * (4 - high)} and 0 < high < 4


def test_ti2v_generates_through_its_16x_vae(family_models):
    engine = DiffusersEngine.from_settings(Settings(model=str(family_models["wan2.2-ti2v"])))
    assert engine.model.family.name == "wan2.2-ti2v" and engine.model.pipe.config.expand_timesteps
    assert engine.model.pipe.vae_scale_factor_spatial == 16
    out = engine.generate([_spec()])
    assert out.videos[0].shape == (9, 64, 64, 3) and out.latents.shape[-2:] == (4, 4)


def test_a_lora_loads_into_both_a14b_experts(family_models, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from training.config import ModelConfig
    from training.convert import save_diffusers_lora
    from training.trainer import prepare_transformer

    folder = family_models["wan2.2-t2v-a14b"]
    plain = DiffusersEngine.from_settings(Settings(model=str(folder)))
    donor = prepare_transformer(plain.model.pipe.transformer.__class__.from_pretrained(folder / "transformer"),
                                ModelConfig(mode="lora", lora_rank=4, lora_alpha=4))  # fmt: skip
    torch.manual_seed(0)
    for name, p in donor.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    file = save_diffusers_lora(get_peft_model_state_dict(donor), tmp_path / "lora", 4, 4, ModelConfig().lora_targets)
    engine = DiffusersEngine.from_settings(Settings(model=str(folder), lora=[str(file)]))
    pipe = engine.model.pipe
    assert "lora_0" in pipe.transformer.peft_config and "lora_0" in pipe.transformer_2.peft_config
    assert not (engine.generate([_spec()]).videos[0] == plain.generate([_spec()]).videos[0]).all()


def test_a_folder_of_no_wan_family_is_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match=r"could not read model_index\.json"):
        load_pipeline(Settings(model=str(tmp_path)))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="'FluxPipeline'"):
        load_pipeline(Settings(model=str(tmp_path)))


def test_the_service_names_the_family_in_info_and_models(start_server, family_models):
    server = start_server(MICROVERSE_MODEL=str(family_models["wan2.2-t2v-a14b"]))
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["model"]["family"] == "wan2.2-t2v-a14b" and info["model"]["inputs"] == ["text"]
    assert info["architecture"]["experts"] == 2
    models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["family"] == "wan2.2-t2v-a14b" and models[0]["inputs"] == ["text"]
    r = httpx.post(server.url + "/generate", json={"prompt": "a cell divides", "num_frames": 9, "seed": 2}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"


def test_each_a14b_expert_takes_its_own_full_fine_tune(family_models, tmp_path, tiny_model_dir):
    from diffusers import WanTransformer3DModel

    folder = family_models["wan2.2-t2v-a14b"]
    tuned = {}
    for expert, seed in (("transformer", 5), ("transformer_2", 6)):
        model = WanTransformer3DModel.from_pretrained(folder / expert)
        torch.manual_seed(seed)
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / expert)
        tuned[expert] = model
    engine = DiffusersEngine.from_settings(Settings(model=str(folder), transformer=str(tmp_path / "transformer"),
                                                    transformer_2=str(tmp_path / "transformer_2")))  # fmt: skip
    for expert, model in tuned.items():
        loaded = getattr(engine.model.pipe, expert).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), expert
    assert engine.model.transformer_2_override == str(tmp_path / "transformer_2")
    with pytest.raises(CheckpointError, match="MICROVERSE_TRANSFORMER_2"):
        load_pipeline(Settings(model=str(tiny_model_dir), transformer_2=str(tmp_path / "transformer_2")))
