"""The shipped few-step student of the demo model (issue 17): size, card, its benchmark figures re-measured, and
serving it as a named adapter with its declared sampling."""

from __future__ import annotations

import json

import httpx
import pytest

from evaluation.physics import evaluate_physics, heldout_cases
from media.video import read_video
from microverse.loading import EMBEDDED_DIR, read_lora
from microverse.sources import engine_generate
from training.distill import LORA_FILE, METRICS_FILE

STUDENT_DIR = EMBEDDED_DIR.parent / "microverse-demo-student"
MAX_BYTES = 30 * 2**20
PROMPT = "a cell divides into two daughter cells"


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((STUDENT_DIR / METRICS_FILE).read_text())


def _row(metrics: dict, label: str) -> dict:
    return next(r for r in metrics["benchmark"]["rows"] if r["label"] == label)


def test_the_student_fits_the_budget_and_its_card_states_the_benchmark(metrics):
    size = sum(f.stat().st_size for f in STUDENT_DIR.rglob("*") if f.is_file())
    assert size <= MAX_BYTES, f"{size / 2**20:.1f} MB shipped"
    card = (STUDENT_DIR / "README.md").read_text()
    bench = metrics["benchmark"]
    assert [r["label"] for r in bench["rows"]] == ["teacher", "fast preset", "student, 4 steps", "student, 2 steps"]
    assert bench["cases"] == 60 and "microverse train distill-bench" in card
    for r in bench["rows"]:
        assert f"| {r['seconds_per_clip']:.2f} | {r['time_vs_teacher']:.2f}x |" in card
    acc = bench["acceptance"]
    assert acc["ok"] and acc["points_vs_teacher"] >= -10 and acc["time_vs_teacher"] <= 0.25
    assert "**met**" in card


def test_the_student_declares_its_sampling_in_its_lora_metadata(metrics):
    lora = read_lora(str(STUDENT_DIR))
    assert lora.file.name == LORA_FILE
    assert lora.defaults == metrics["declared"]
    assert lora.defaults["num_inference_steps"] == metrics["config"]["declared_steps"] == 2
    assert lora.defaults["guidance_scale"] == 1.0
    assert lora.defaults["cfg_distilled"] and lora.defaults["scheduler"] == "euler"


def test_the_students_physics_accuracy_holds_on_the_shipped_weights(metrics):
    """Re-measured through the serving engine on the benchmark's 60 held-out cases (4 forwards a clip, so cheap):
    equal on the machine that measured it; another CPU's float rounding may move a case or two."""
    row = _row(metrics, f"student, {metrics['config']['declared_steps']} steps")
    cases = heldout_cases(metrics["config"]["eval_per_process"], size=48, frames=17, looks=("fluorescence",))
    gen = engine_generate(EMBEDDED_DIR, 48, 17, row["steps"], row["guidance_scale"], lora=STUDENT_DIR)
    got = evaluate_physics(gen, cases, "student").accuracy()["overall"]
    assert abs(got - row["accuracy"]["overall"]) <= 0.05, (got, row["accuracy"]["overall"])


def test_one_server_serves_the_teacher_and_the_student_adapter(start_server):
    server = start_server(MICROVERSE_MODEL="", MICROVERSE_LORAS=f"student={STUDENT_DIR}")
    models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["microverse-demo", "student"]
    body = {"prompt": PROMPT, "seed": 1, "lora": "student", "preset": "distilled"}
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    frames, fps = read_video(r.content)
    assert frames.shape == (17, 48, 48, 3) and fps == 8
    r = httpx.post(server.url + "/generate", json={"prompt": PROMPT, "lora": "student", "guidance_scale": 5},
                   timeout=60)  # fmt: skip
    assert r.status_code == 400 and "guidance_scale" in r.text
    assert httpx.post(server.url + "/generate", json={"prompt": PROMPT, "seed": 1}, timeout=120).status_code == 200
