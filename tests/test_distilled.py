"""Distilled checkpoints and adapters (issue 17, item 3): declared sampling defaults (steps, guidance 1 = no
unconditional forward, sampler, shift) from ``microverse_defaults.json`` or a LoRA's metadata, the ``distilled``
preset, and a clear 400 for CFG on a CFG-distilled model."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file

from microverse.config import Settings
from microverse.loading import DEFAULTS_FILE, DEFAULTS_METADATA_KEY, CheckpointError, load_pipeline
from tests.test_lora_formats import Delta

DISTILLED = {"num_inference_steps": 4, "guidance_scale": 1.0, "cfg_distilled": True, "scheduler": "unipc",
             "flow_shift": 5.0}
SMALL = {"height": 32, "width": 32, "num_frames": 5, "seed": 1}


@pytest.fixture(scope="module")
def distilled_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint, declaring a 4-step, CFG-distilled UniPC sampling with shift 5."""
    folder = tmp_path_factory.mktemp("distilled") / "model"
    shutil.copytree(tiny_model_dir, folder)
    defaults = json.loads((folder / DEFAULTS_FILE).read_text())
    (folder / DEFAULTS_FILE).write_text(json.dumps({**defaults, **DISTILLED}))
    return folder


def record_forwards(client) -> list[tuple[str, float]]:
    """(scheduler class, its shift) at every transformer forward of the client's engine."""
    pipe = client.app.state.runtime.engine.model.pipe
    seen: list[tuple[str, float]] = []

    def hook(module, args, kwargs):
        cfg = pipe.scheduler.config
        seen.append((type(pipe.scheduler).__name__, cfg.get("flow_shift") or cfg.get("shift")))

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_a_distilled_checkpoint_runs_its_declared_sampling_one_forward_per_step(make_client, distilled_dir):
    client = make_client(model=str(distilled_dir))
    seen = record_forwards(client)
    r = client.post("/generate", json={"prompt": "a cell divides", **SMALL})
    assert r.status_code == 200, r.text
    assert seen == [("UniPCMultistepScheduler", 5.0)] * 4  # 4 steps, no unconditional forward
    r = client.post("/generate", json={"prompt": "a cell divides", "preset": "distilled", **SMALL})
    assert r.status_code == 200 and len(seen) == 8
    assert client.app.state.runtime.engine.model.pipe.scheduler.__class__.__name__ == "FlowMatchEulerDiscreteScheduler"
    video = client.post("/v1/videos", json={"prompt": "a cell", "size": "32x32"}).json()
    assert video["num_inference_steps"] == 4 and video["guidance_scale"] == 1.0


@pytest.mark.parametrize("path", ["/generate", "/v1/videos"])
def test_guidance_on_a_cfg_distilled_model_is_a_400_naming_guidance_scale(make_client, distilled_dir, path):
    client = make_client(model=str(distilled_dir))
    r = client.post(path, json={"prompt": "a cell", "guidance_scale": 5.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale"
    assert "CFG-distilled" in r.json()["error"]["message"]


def test_the_distilled_preset_needs_a_declared_sampling_and_keeps_it(make_client, distilled_dir):
    plain = make_client()
    r = plain.post("/generate", json={"prompt": "a cell", "preset": "distilled"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "preset"
    client = make_client(model=str(distilled_dir))
    r = client.post("/generate", json={"prompt": "a cell", "preset": "distilled", "num_inference_steps": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_inference_steps"


def test_an_adapter_declaring_its_sampling_in_lora_metadata_sets_the_defaults_of_its_requests(
        make_client, tiny_model_dir, tmp_path):
    base = load_pipeline(Settings(model=str(tiny_model_dir), storage_dir=tmp_path)).pipe.transformer
    path = tmp_path / "distill.safetensors"
    euler = {**DISTILLED, "scheduler": "euler", "flow_shift": 7.0}
    save_file(Delta(base).file("comfyui", base), str(path), metadata={DEFAULTS_METADATA_KEY: json.dumps(euler)})
    client = make_client(loras={"fast4": str(path)})
    seen = record_forwards(client)
    assert client.post("/generate", json={"prompt": "a cell", "lora": "fast4", **SMALL}).status_code == 200
    assert seen == [("FlowMatchEulerDiscreteScheduler", 7.0)] * 4
    seen.clear()
    assert client.post("/generate", json={"prompt": "a cell", "num_inference_steps": 3, **SMALL}).status_code == 200
    assert len(seen) == 6 and seen[0] == ("FlowMatchEulerDiscreteScheduler", 3.0)  # the base: CFG 5, its own sampler
    r = client.post("/generate", json={"prompt": "a cell", "lora": "fast4", "guidance_scale": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale"


def test_bad_declared_defaults_stop_loading_naming_the_field(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"scheduler": "dpm++", "num_inference_steps": 4}))
    with pytest.raises(CheckpointError, match=r"microverse_defaults.json: microverse defaults field scheduler"):
        load_pipeline(Settings(model=str(folder), storage_dir=tmp_path))
