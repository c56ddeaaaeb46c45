"""The shipped demo model (issue 5): the embedded default, its size and card, and its acceptance figures."""

from __future__ import annotations

import json

import httpx
import pytest

from evaluation.physics import acceptance_checks
from media.video import read_video
from microverse import loading
from microverse.config import Settings
from microverse.loading import EMBEDDED_DIR, CheckpointError, load_pipeline
from microverse.sources import engine_generate
from training.demo import METRICS_FILE, TOLERANCE

MAX_BYTES = 30 * 2**20


@pytest.fixture(scope="module")
def card_metrics() -> dict:
    return json.loads((EMBEDDED_DIR / METRICS_FILE).read_text())


def test_shipped_model_fits_the_budget_and_its_card_states_the_figures(card_metrics):
    size = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert size <= MAX_BYTES, f"{size / 2**20:.1f} MB shipped"
    card = (EMBEDDED_DIR / "README.md").read_text()
    assert (EMBEDDED_DIR / "loss.png").stat().st_size > 0 and "loss.png" in card
    for check in card_metrics["acceptance"].values():
        assert check["ok"] and f"| {check['passed']}/{check['n']} |" in card
    assert card_metrics["generation"]["seconds_median"] <= 10
    t = card_metrics["timings"]
    assert t["data"] + t["vae"] + t["dit"] <= 45 * 60
    assert "microverse train demo --out outputs/demo" in card


def test_the_embedded_default_is_the_demo_model(card_metrics):
    model = load_pipeline(Settings())
    assert model.name == "microverse-demo" and model.source == str(EMBEDDED_DIR)
    assert "trained" in model.description
    d = model.defaults
    cfg = card_metrics["config"]
    assert (d.height, d.width, d.num_frames, d.fps) == (cfg["size"], cfg["size"], cfg["frames"], cfg["fps"])
    assert d.num_frames >= 17


def test_a_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "EMBEDDED_DIR", tmp_path / "gone")
    with pytest.raises(CheckpointError, match="MICROVERSE_MODEL"):
        load_pipeline(Settings())


def test_acceptance_checks_hold_on_the_shipped_weights(card_metrics):
    """Re-measured through the serving engine, the card's acceptance figures hold within its tolerance
    (on the machine that trained it they repeat exactly; another CPU's float rounding may move a seed)."""
    cfg = card_metrics["config"]
    gen = engine_generate(EMBEDDED_DIR, cfg["size"], cfg["frames"], cfg["steps"], cfg["guidance_scale"])
    got = acceptance_checks(gen, range(cfg["eval_seeds"]))
    for name, check in got.items():
        assert abs(check["passed"] - card_metrics["acceptance"][name]["passed"]) <= TOLERANCE["acceptance_seeds"], (
            name, check, card_metrics["acceptance"][name])


def test_make_serve_default_serves_the_demo_model(start_server, card_metrics):
    server = start_server(MICROVERSE_MODEL="")  # what `make serve` runs: no model named
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["model"]["name"] == "microverse-demo"
    r = httpx.post(server.url + "/generate", json={"prompt": "a cell divides into two daughter cells", "seed": 3},
                   timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    frames, fps = read_video(r.content)
    cfg = card_metrics["config"]
    assert frames.shape == (cfg["frames"], cfg["size"], cfg["size"], 3) and fps == cfg["fps"]
