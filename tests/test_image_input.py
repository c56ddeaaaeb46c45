"""Image-conditioned generation (issue 18, items 2 and 3): ``input_reference`` on ``/v1/videos`` as the openai client
sends it, ``image`` on ``/generate``, checked at the edge, fitted, stored with the job; tiny Wan2.1 I2V and Wan2.2
TI2V checkpoints built in code."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from media.video import read_video
from microverse.config import Settings
from microverse.engine import DiffusersEngine
from microverse.images import fit, load_reference
from microverse.schemas import GenerationSpec, InputError
from microverse.tools.tiny import TinyWanConfig, save_tiny_pipeline
from tests.conftest import wait_in_progress

PROMPT = "this cell divides"


def cell_png(width: int = 96, height: int = 64, mode: str = "RGB") -> bytes:
    """A bright disc on a dark background, PNG-encoded."""
    yy, xx = np.mgrid[0:height, 0:width]
    disc = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 3) ** 2).astype(np.uint8)
    rgb = np.stack([disc * 40 + 10, disc * 220 + 10, disc * 90 + 10], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    return {f: save_tiny_pipeline(root / f, TinyWanConfig(family=f)) for f in ("wan2.1-i2v", "wan2.2-ti2v")}


def test_fit_covers_the_size_and_crops_the_centre():
    image = Image.new("RGB", (200, 100))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # the left quarter, cropped away when fitting 64x64
    out = fit(image, 64, 64)
    assert out.size == (64, 64) and out.getpixel((0, 32)) != (255, 0, 0)
    assert fit(Image.new("RGB", (10, 30)), 48, 32).size == (48, 32)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "CMYK"])
def test_any_mode_becomes_rgb(mode):
    if mode == "CMYK":
        buf = io.BytesIO()
        Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(buf, format="JPEG")
        data = buf.getvalue()
    elif mode == "I;16":
        buf = io.BytesIO()
        Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = cell_png(mode=mode)
    image = load_reference(data, "image")
    assert image.mode == "RGB" and np.asarray(image).max() > 0


def test_every_mode_the_accepted_formats_carry_becomes_rgb():
    """Microscopy brings 16-bit and float images: every mode PIL writes in an accepted format converts, none fails."""
    converted = 0
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16",
                 "I;16B", "La"):  # fmt: skip
        for fmt in ("TIFF", "PNG", "WEBP", "BMP", "JPEG"):
            buf = io.BytesIO()
            try:
                Image.new(mode, (16, 12)).save(buf, format=fmt)
            except (OSError, ValueError, KeyError):
                continue  # PIL cannot write this mode in this format
            image = load_reference(buf.getvalue(), "image")
            assert image.mode == "RGB" and image.size == (16, 12), (mode, fmt)
            converted += 1
    assert converted >= 40, converted


@pytest.mark.parametrize("data,message", [
    (b"", "is empty"),
    (b"definitely not an image", "not a decodable image"),
    (cell_png()[:40], "not a decodable image"),
])  # fmt: skip
def test_bad_references_name_the_field(data, message):
    with pytest.raises(InputError, match=message) as err:
        load_reference(data, "input_reference")
    assert err.value.param == "input_reference"


def test_a_gif_and_an_oversized_image_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(InputError, match="GIF"):
        load_reference(buf.getvalue(), "image")
    buf = io.BytesIO()
    Image.new("L", (9000, 2)).save(buf, format="PNG")
    with pytest.raises(InputError, match="9000x2"):
        load_reference(buf.getvalue(), "image")


def test_ti2v_fixes_the_first_frame_to_the_reference_through_the_vae(image_models, tmp_path):
    """TI2V replaces the first latent frame with the image's latent, so the first decoded frame is the reference's
    VAE round trip (the causal VAE decodes frame 0 from latent frame 0 alone)."""
    from microverse.images import store_reference

    engine = DiffusersEngine.from_settings(Settings(model=str(image_models["wan2.2-ti2v"])))
    ref = fit(load_reference(cell_png(), "image"), 64, 64)
    spec = GenerationSpec(prompt=PROMPT, negative_prompt="", height=64, width=64, num_frames=9, num_inference_steps=3,
                          guidance_scale=5.0, seed=0, fps=8, image=store_reference(ref, tmp_path))  # fmt: skip
    video = engine.generate([spec]).videos[0]
    vae = engine.model.pipe.vae
    pixels = torch.from_numpy(np.asarray(ref)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0, :, 0]
    expected = ((round_trip.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    mse = float(np.mean((video[0].astype(np.float64) - expected) ** 2))
    psnr = 10 * np.log10(255**2 / max(mse, 1e-10))
    print(f"TI2V first frame vs the reference's VAE round trip: PSNR {psnr:.1f} dB")
    assert psnr > 40, psnr
    text_only = engine.generate([GenerationSpec(**{**spec.__dict__, "image": None})]).videos[0]
    assert not np.array_equal(text_only[0], video[0])


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v", "wan2.2-i2v-a14b"])
def test_each_image_family_loads_and_generates_a_batch_from_one_reference(family, tmp_path):
    from microverse.images import store_reference

    folder = save_tiny_pipeline(tmp_path / family, TinyWanConfig(family=family))
    engine = DiffusersEngine.from_settings(Settings(model=str(folder)))
    assert engine.model.family.name == family and engine.model.image_pipe is not None
    ref = store_reference(fit(load_reference(cell_png(), "image"), 64, 64), tmp_path)
    specs = [GenerationSpec(prompt=PROMPT, negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=2,
                            guidance_scale=5.0, seed=seed, fps=8, image=ref) for seed in (0, 1)]  # fmt: skip
    videos = engine.generate(specs).videos
    assert [v.shape for v in videos] == [(5, 64, 64, 3)] * 2 and not np.array_equal(videos[0], videos[1])


def test_i2v_batches_requests_that_share_a_reference_and_keeps_different_ones_apart(image_models, tmp_path):
    from microverse.images import store_reference

    engine = DiffusersEngine.from_settings(Settings(model=str(image_models["wan2.1-i2v"])))
    ref = store_reference(fit(load_reference(cell_png(), "image"), 64, 64), tmp_path)
    other = store_reference(fit(load_reference(cell_png(80, 80), "image"), 64, 64), tmp_path)
    spec = GenerationSpec(prompt=PROMPT, negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=2,
                          guidance_scale=5.0, seed=0, fps=8, image=ref)  # fmt: skip
    second = GenerationSpec(**{**spec.__dict__, "seed": 1})
    out = engine.generate([spec, second])
    assert len(out.videos) == 2 and not np.array_equal(out.videos[0], out.videos[1])
    alone = engine.generate([second]).videos[0]
    assert np.abs(alone.astype(int) - out.videos[1].astype(int)).mean() < 0.05
    assert ref != other and spec.batch_key != GenerationSpec(**{**spec.__dict__, "image": other}).batch_key
    with pytest.raises(ValueError, match="incompatible specs"):
        engine.generate([spec, GenerationSpec(**{**spec.__dict__, "image": other})])


def test_the_openai_client_animates_a_reference_on_i2v_and_ti2v(start_server, image_models, tmp_path):
    png = tmp_path / "cell.png"
    png.write_bytes(cell_png())
    for family, folder in image_models.items():
        server = start_server(MICROVERSE_MODEL=str(folder))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        with png.open("rb") as f:
            video = client.videos.create(prompt=PROMPT, input_reference=f, size="64x64", seconds="1")
        done = client.videos.poll(video.id, poll_interval_ms=200)
        assert done.status == "completed", (family, done)
        frames, _ = read_video(client.videos.download_content(video.id).read())
        assert frames.shape[1:] == (64, 64, 3), family
        info = httpx.get(server.url + "/info", timeout=30).json()
        assert info["model"]["family"] == family and info["model"]["inputs"] == ["text", "image"]
        if family == "wan2.1-i2v":  # the image is required; /generate takes it as base64 or a file field
            r = httpx.post(server.url + "/v1/videos", json={"prompt": PROMPT}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference", r.text
            data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
            r = httpx.post(server.url + "/generate", json={"prompt": PROMPT, "image": data_url, "num_frames": 5,
                                                           "height": 64, "width": 64}, timeout=120)  # fmt: skip
            assert r.status_code == 200, r.text
            r = httpx.post(server.url + "/generate", data={"prompt": PROMPT, "num_frames": "5"},
                           files={"image": ("cell.png", png.read_bytes(), "image/png")}, timeout=120)
            assert r.status_code == 200, r.text
            for bad in (b"", b"not an image", b"GIF89a" + b"\0" * 50):
                r = httpx.post(server.url + "/generate", data={"prompt": PROMPT},
                               files={"image": ("x.png", bad, "image/png")}, timeout=30)
                assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
            r = httpx.post(server.url + "/generate", data={"prompt": PROMPT},
                           files={"image": ("big.png", b"\0" * (50 << 20), "image/png")}, timeout=60)
            assert r.status_code in (400, 413) and r.json()["error"]["param"] == "image", r.text[:300]
            assert httpx.get(server.url + "/livez", timeout=10).status_code == 200


def test_a_text_only_model_refuses_an_image_naming_the_field(start_server, tmp_path):
    server = start_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt=PROMPT, input_reference=("cell.png", cell_png(), "image/png"), size="64x64")
    assert err.value.body["param"] == "input_reference", err.value.body
    r = httpx.post(server.url + "/generate", json={"prompt": PROMPT, "image": "data:image/png;base64,iVBORw0KGgo="},
                   timeout=30)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text


def test_kill_9_during_an_image_job_then_restart_completes_it_from_the_stored_image(start_server, image_models):
    server = start_server(MICROVERSE_MODEL=str(image_models["wan2.1-i2v"]))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    video = client.videos.create(prompt=PROMPT, input_reference=("cell.png", cell_png(), "image/png"), size="128x128",
                                 extra_body={"num_frames": 33, "num_inference_steps": 100, "seed": 3})
    wait_in_progress(client, video.id)
    server.kill9()

    server.start()  # same storage dir: the job is recovered and re-run from <storage>/inputs/<sha256>.png
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    v = client.videos.poll(video.id, poll_interval_ms=100)
    assert v.status == "completed", v
    frames, _ = read_video(client.videos.download_content(video.id).read())
    assert frames.shape == (33, 128, 128, 3)


def test_eval_run_sends_per_task_reference_images_to_an_image_conditioned_endpoint(
    start_server, image_models, bench_dir, tmp_path
):
    """``--reference-images``: a task with ``<index>.png`` goes out with it as input_reference, one without stays text
    only (the TI2V endpoint takes both); each stored reference is one the endpoint fitted."""
    from evaluation.cache import JudgementCache
    from evaluation.microworldbench import load_benchmark
    from evaluation.runner import GenerationConfig, generate_videos

    server = start_server(MICROVERSE_MODEL=str(image_models["wan2.2-ti2v"]), MICROVERSE_STORAGE_DIR=tmp_path / "st")
    tasks = list(load_benchmark(bench_dir).tasks.values())[:2]
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / f"{tasks[0].index}.png").write_bytes(cell_png())
    config = GenerationConfig(endpoint=server.url, size="64x64", num_frames=5, num_inference_steps=2,
                              poll_interval_s=0.2, reference_images=refs)  # fmt: skip
    assert config.reference_for(tasks[0]) == refs / f"{tasks[0].index}.png" and config.reference_for(tasks[1]) is None
    videos = generate_videos(tasks, config, tmp_path / "videos", JudgementCache(tmp_path / "cache.sqlite"))
    assert sorted(videos) == sorted(t.index for t in tasks)
    stored = list((tmp_path / "st" / "inputs").glob("*.png"))
    assert len(stored) == 1 and Image.open(stored[0]).size == (64, 64)


def test_microverse_generate_takes_an_image_for_an_image_conditioned_model(image_models, tmp_path):
    from click.testing import CliRunner

    from microverse.cli import main

    png = tmp_path / "cell.png"
    png.write_bytes(cell_png())
    common = ["generate", "this cell divides", "--model", str(image_models["wan2.1-i2v"]), "--height", "64",
              "--width", "64", "--num-frames", "5", "--steps", "2", "--storage-dir", str(tmp_path / "st")]  # fmt: skip
    res = CliRunner().invoke(main, [*common, "--image", str(png), "-o", str(tmp_path / "out.mp4")])
    assert res.exit_code == 0, res.output
    frames, _ = read_video((tmp_path / "out.mp4").read_bytes())
    assert frames.shape == (5, 64, 64, 3)
    res = CliRunner().invoke(main, common)
    assert res.exit_code == 2 and "--image" in res.output and "reference image" in res.output
