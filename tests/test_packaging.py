"""The package as a user installs it: ``pip install <checkout>`` into a fresh venv outside the checkout, then
``microverse serve`` from another directory serves the embedded model; a serving install pulls none of the
``eval`` and ``train`` extras."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from microverse.tools.service_process import REPO_ROOT, free_port, stop_service, wait_ready

PACKAGES = ("microverse", "training", "evaluation", "simulator", "media")
EXTRAS_ONLY = ("scipy", "scikit-learn", "matplotlib", "tensorboard", "scenedetect")
"""Distributions only the ``eval`` / ``train`` extras bring."""


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _source_copy(dest: Path) -> Path:
    """The checkout's package sources (what ``pip install <checkout>`` builds), copied so that the build
    writes nothing into the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_pip_install_then_serve_from_anywhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the torch build this environment has (CPU here), so pip does not pick a CUDA build by itself
    _pip(python, f"torch=={importlib.metadata.version('torch').split('+')[0]}")
    _pip(python, str(_source_copy(tmp_path / "src")))

    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert "microverse" in installed
    assert not installed & set(EXTRAS_ONLY), f"a serving install pulled {sorted(installed & set(EXTRAS_ONLY))}"

    version = subprocess.run([str(venv / "bin" / "microverse"), "--version"], capture_output=True, text=True,
                             cwd=tmp_path, check=False)
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stdout + version.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port, log = free_port(), tmp_path / "serve.log"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MICROVERSE_CACHE_DIR": str(tmp_path / "cache"),
           **{k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}}
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(venv / "bin" / "microverse"), "serve", "--port", str(port), "--host",
                                 "127.0.0.1"], cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(proc, port, log, timeout=300)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=30).json()
        assert str(REPO_ROOT) not in str(info), "the server runs the checkout, not the installed package"
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "a cell divides", "seed": 1,
                                                                   "num_inference_steps": 2}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "video/mp4"
        assert r.content[4:8] == b"ftyp"
    finally:
        stop_service(proc, grace=20)
