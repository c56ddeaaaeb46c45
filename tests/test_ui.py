"""The ``/ui`` playground end to end in headless Chromium (Playwright driving Debian's chromium)."""

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from evaluation.fake_judge import FakeJudgeServer
from tests.conftest import REPO_ROOT, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Refresh the committed screenshot with MICROVERSE_UPDATE_SCREENSHOT=1; otherwise it goes to a temp dir.
SCREENSHOT = REPO_ROOT / "docs" / "playground.png"


@pytest.fixture
def adapter_file(tiny_model_dir, tmp_path) -> str:
    """A LoRA file for the playground's adapter choice."""
    from safetensors.torch import save_file

    from microverse.config import Settings
    from microverse.loading import load_pipeline
    from tests.test_lora_formats import Delta

    base = load_pipeline(Settings(model=str(tiny_model_dir), storage_dir=tmp_path)).pipe.transformer
    save_file(Delta(base).file("comfyui", base), str(tmp_path / "cells.safetensors"))
    return str(tmp_path / "cells.safetensors")


@pytest.fixture
def ui_service(make_settings, monkeypatch, bench_dir, adapter_file):
    """The service app with the playground router and a (fake) judge, served by uvicorn on loopback."""
    with FakeJudgeServer() as judge:
        monkeypatch.setenv("MICROVERSE_JUDGE_BASE_URL", judge.base_url)
        monkeypatch.setenv("MICROVERSE_JUDGE_MODEL", "fake-judge")
        monkeypatch.setenv("MICROVERSE_JUDGE_API_KEY", "test")
        monkeypatch.setenv("MICROVERSE_BENCHMARK", str(bench_dir))
        yield from serve_app(make_settings(loras={"cells": adapter_file}))


@pytest.fixture
def ui_i2v_service(make_settings, tmp_path):
    """The playground on a tiny Wan2.1 I2V checkpoint (no key, no judge)."""
    from microverse.tools.tiny import TinyWanConfig, save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "tiny-i2v", TinyWanConfig(family="wan2.1-i2v"))
    yield from serve_app(make_settings(model=str(folder)))


def serve_app(settings):
    """Serve the app with a runtime of ``settings`` by uvicorn on loopback; yields its URL."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip("chromium not found at /usr/bin/chromium; apt-get install chromium")
    from microverse.api import create_app
    from microverse.runtime import Runtime

    app = create_app()
    app.state.runtime = Runtime.start(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.runtime.stop()


def test_ui_page_is_self_contained(make_client):
    client = make_client()
    resp = client.get("/ui")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    for element in ('id="prompt"', 'id="submit"', "<video", 'id="gallery"', 'id="judge-btn"', 'id="api-key"'):
        assert element in html, element
    assert "http://" not in html and "https://" not in html, "no external resources"


@pytest.mark.slow
def test_ui_generates_plays_and_judges(ui_service, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        authorized: list[str] = []
        page.on("request", lambda r: r.headers.get("authorization") == "Bearer k1" and authorized.append(r.url))
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

        page.goto(ui_service + "/ui")
        page.fill("#api-key", "k1")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('cpu')")
        assert page.evaluate("localStorage.getItem('microverse.apiKey')") == "k1"
        assert page.is_visible("#judge-panel"), "/info reports a judge, so the judge panel shows"

        page.evaluate("""() => { window.seen = [];
            new MutationObserver(() => window.seen.push(document.getElementById('status').textContent))
              .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true}); }""")
        page.fill("#prompt", "a cell divides into two daughter cells")
        for selector, value in (("#width", "64"), ("#height", "64"), ("#frames", "9"), ("#steps", "2"),
                                ("#seed", "7")):
            page.fill(selector, value)
        assert page.is_visible("#adapter"), "/v1/models lists an adapter, so the choice shows"
        assert page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)") == ["", "cells"]
        page.select_option("#adapter", "cells")
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').dataset.status === 'completed'", timeout=120_000)
        seen = page.evaluate("window.seen")
        assert seen[-1].startswith("completed") and "100%" in seen[-1], seen
        assert page.evaluate("document.getElementById('progress-bar').style.width") == "100%"

        page.wait_for_function("document.getElementById('player').readyState >= 2", timeout=30_000)
        page.evaluate("document.getElementById('player').play()")
        page.wait_for_function("document.getElementById('player').currentTime > 0", timeout=30_000)
        assert page.evaluate("(v => [v.videoWidth, v.videoHeight])(document.getElementById('player'))") == [64, 64]

        jobs = httpx.get(ui_service + "/v1/videos?limit=1", headers={"Authorization": "Bearer k1"}).json()["data"]
        job_id = jobs[0]["id"]
        assert jobs[0]["status"] == "completed" and jobs[0]["num_frames"] == 9 and jobs[0]["seed"] == 7
        assert jobs[0]["lora"] == "cells"
        card = f".card[data-id='{job_id}']"
        page.wait_for_function(f"document.querySelector(\"{card} img\")?.naturalWidth > 0", timeout=30_000)
        assert page.get_attribute(card, "data-status") == "completed"
        assert any(u.endswith("/v1/videos") for u in authorized), "the API key is sent as a Bearer token"

        page.click("#judge-btn")
        page.wait_for_selector("#task-score", timeout=60_000)
        assert 0 <= float(page.text_content("#task-score")) <= 100
        dims = page.eval_on_selector_all("#judge-result tr td:first-child", "tds => tds.map(t => t.textContent)")
        assert sorted(dims) == ["instruction", "scientific", "visual"]
        assert not page.text_content("#error")
        assert not console_errors, console_errors

        shot = SCREENSHOT if os.environ.get("MICROVERSE_UPDATE_SCREENSHOT") else tmp_path / "playground.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_ui_uploads_a_reference_image_to_an_image_to_video_model(ui_i2v_service, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.test_image_input import cell_png

    png = tmp_path / "cell.png"
    png.write_bytes(cell_png())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(ui_i2v_service + "/ui")
        page.wait_for_function("!document.getElementById('image-row').classList.contains('hidden')")
        assert page.text_content("#image-need") == "(required)"
        page.fill("#prompt", "this cell divides")
        for selector, value in (("#width", "64"), ("#height", "64"), ("#frames", "5"), ("#steps", "2")):
            page.fill(selector, value)
        page.set_input_files("#reference", str(png))
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').dataset.status === 'completed'", timeout=120_000)
        assert not page.text_content("#error") and not console_errors, console_errors
        browser.close()
    jobs = httpx.get(ui_i2v_service + "/v1/videos?limit=1").json()["data"]
    assert jobs[0]["status"] == "completed" and jobs[0]["num_frames"] == 5
