"""Adapters chosen per request (issue 17, item 2): one process holds several named LoRAs; a request picks one
with ``lora`` (or as its OpenAI ``model``); the adapter is part of the batch key; ``GET /v1/models`` lists them."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from media.video import read_video
from microverse.config import Settings
from microverse.loading import load_pipeline
from tests.test_lora_formats import Delta

PROMPTS = {"a": "a cell divides", "b": "blood flows through a capillary", None: "a vesicle moves along a microtubule"}
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("adapters")
    base = load_pipeline(Settings(model=str(tiny_model_dir), storage_dir=tmp)).pipe.transformer
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        files[name] = str(tmp / f"{name}.safetensors")
        save_file(Delta(base, seed=seed).file("comfyui", base), files[name])
    return files


def frames_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return read_video(response.content)[0].astype(int)


def test_concurrent_requests_for_different_adapters_equal_servers_holding_only_that_adapter(
        make_client, adapter_files, tmp_path):
    client = make_client(loras=adapter_files, max_batch_wait_ms=300)
    results = {}

    def call(adapter):
        body = {"prompt": PROMPTS[adapter], **SMALL, **({"lora": adapter} if adapter else {})}
        results[adapter] = client.post("/generate", json=body)

    threads = [threading.Thread(target=call, args=(a,)) for a in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = client.get("/info").json()
    assert info["model"]["adapters"] == {k: Path(v).name for k, v in adapter_files.items()}  # no local paths shown
    assert info["adapter_switches"]["count"] >= 2 and info["adapter_switches"]["mean_ms"] >= 0
    for adapter in PROMPTS:
        # Its own job store: runtimes on one store share its queue (as replicas do), so its worker could take the
        # other client's jobs.
        alone = make_client(lora=[adapter_files[adapter]] if adapter else [], storage_dir=tmp_path / f"alone-{adapter}")
        want = frames_of(alone.post("/generate", json={"prompt": PROMPTS[adapter], **SMALL}))
        got = frames_of(results[adapter])
        assert np.abs(got - want).max() <= 1, (adapter, np.abs(got - want).max())
    a_on_base = frames_of(client.post("/generate", json={"prompt": PROMPTS["a"], **SMALL}))
    assert np.abs(a_on_base - frames_of(results["a"])).mean() > 1.0, "the adapter must change the video"


def test_models_list_through_the_openai_client_and_adapter_as_model(make_client, adapter_files):
    from openai import OpenAI

    client = make_client(loras=adapter_files)
    openai = OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client)
    models = openai.models.list().data
    base = client.app.state.runtime.engine.model.name
    assert [m.id for m in models] == [base, "a", "b"]
    assert [getattr(m, "parent", None) for m in models] == [None, base, base]
    video = openai.videos.create(prompt="a cell divides", model="b", size="32x32",
                                 extra_body={"num_frames": 5, "num_inference_steps": 2})
    assert client.app.state.runtime.store.get(video.id).spec.lora == "b"


@pytest.mark.parametrize(("body", "param"), [
    ({"lora": "c"}, "lora"), ({"lora": "a", "lora_scale": 9}, "lora_scale"), ({"lora_scale": 0.5}, "lora_scale"),
    ({"lora": "a", "lora_scale": "NaN"}, "lora_scale"),
])
def test_bad_adapter_fields_are_400_naming_the_field(make_client, adapter_files, body, param):
    client = make_client(loras=adapter_files)
    for path, extra in (("/generate", {}), ("/v1/videos", {"size": "32x32"})):
        r = client.post(path, json={"prompt": "a cell", **extra, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)


def test_a_model_naming_no_adapter_lists_what_is_served(make_client, adapter_files):
    client = make_client(loras=adapter_files)
    r = client.post("/v1/videos", json={"prompt": "a cell", "model": "z"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "a, b" in r.json()["error"]["message"]


def test_adapter_settings_are_checked(tmp_path):
    assert Settings(loras="cells=/x/a.safetensors, dna=/y").loras == {"cells": "/x/a.safetensors", "dna": "/y"}
    assert Settings(loras="cells=/x").to_env()["MICROVERSE_LORAS"] == "cells=/x"
    for bad in ("noequals", "lora_0=/x", "bad name=/x"):
        with pytest.raises(ValueError, match="loras"):
            Settings(loras=bad)
