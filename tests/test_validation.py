"""Every bad input gets a 4xx naming the field, in OpenAI's error shape; never a 500."""

import pytest

BAD_GENERATE = [
    ({"prompt": "x", "height": 33}, "height"),
    ({"prompt": "x", "width": 8}, "width"),
    ({"prompt": "x", "height": 0}, "height"),
    ({"prompt": "x", "height": 4096, "width": 4096}, "height"),
    ({"prompt": "x", "num_frames": 8}, "num_frames"),
    ({"prompt": "x", "num_frames": 85}, "num_frames"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 20.5}, "guidance_scale"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "x", "height": "tall"}, "height"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "fps": 0}, "fps"),
    ({"prompt": "x", "negative_prompt": "n" * 2001}, "negative_prompt"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from microverse.api import create_app
    from microverse.config import Settings
    from microverse.runtime import Runtime
    from microverse.tools.tiny import save_tiny_pipeline

    tmp = tmp_path_factory.mktemp("validation")
    app = create_app()
    app.state.runtime = Runtime.start(Settings(model=str(save_tiny_pipeline(tmp / "m")), storage_dir=tmp / "s"))
    yield TestClient(app, raise_server_exceptions=False)
    app.state.runtime.stop()


def assert_openai_error(resp, status, param):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    assert param in err["message"] or param == "body"
    assert "Traceback" not in resp.text


@pytest.mark.parametrize("body,param", BAD_GENERATE)
def test_generate_rejects_bad_input(client, body, param):
    assert_openai_error(client.post("/generate", json=body), 400, param)


@pytest.mark.parametrize("body,param", [(b"{not json", "body"), (b"[1, 2]", "body")])
def test_generate_rejects_malformed_json(client, body, param):
    resp = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_generate_rejects_oversized_body(client):
    resp = client.post("/generate", json={"prompt": "x" * 100_000})
    assert resp.status_code == 413


@pytest.mark.parametrize("form,param", [
    ({"prompt": "x", "size": "64by64"}, "size"),
    ({"prompt": "x", "size": "65x64"}, "width"),
    ({"prompt": "x", "size": "64x1024"}, "height"),
    ({"prompt": "x", "size": "1024x64"}, "width"),
    ({"prompt": "x", "seconds": "-1"}, "seconds"),
    ({"prompt": "x", "seconds": "600"}, "seconds"),
    ({"prompt": "x", "num_frames": "10"}, "num_frames"),
    ({"prompt": "x", "model": "sora-2"}, "model"),
    ({"prompt": "x", "guidance_scale": "abc"}, "guidance_scale"),
    ({"prompt": "x", "nonsense": "1"}, "nonsense"),
    ({"size": "64x64"}, "prompt"),
])
def test_v1_videos_rejects_bad_input(client, form, param):
    assert_openai_error(client.post("/v1/videos", data=form), 400, param)
    assert_openai_error(client.post("/v1/videos", json=form), 400, param)


def test_v1_unknown_ids_are_404_and_never_touch_paths(client):
    for vid in ("video_" + "0" * 32, "../../etc/passwd", "video_..%2F..%2Fx"):
        resp = client.get(f"/v1/videos/{vid}")
        assert resp.status_code == 404 and "error" in resp.json()
    assert client.get("/v1/videos?after=video_nope").status_code == 400
    assert client.get("/v1/videos?limit=0").json()["error"]["param"] == "limit"
