"""What an anonymous caller learns about the machine (issue 20, "also worth deciding"): without
``MICROVERSE_API_KEY``, ``/info`` shows local paths by their last component only, and ``microverse serve`` warns
when it binds a non-loopback address."""

from __future__ import annotations

import json
import logging
import os

import pytest
from click.testing import CliRunner

from microverse.cli import main
from microverse.routers.health import redact_paths

KEY = "s3cret-key"


def test_anonymous_info_shows_no_local_path(make_client, tiny_model_dir):
    info = make_client().get("/info")
    assert info.status_code == 200, info.text
    model = info.json()["model"]
    assert model["source"] == tiny_model_dir.name and tiny_model_dir.name in model["description"], model
    assert str(tiny_model_dir.parent) not in info.text, "an absolute path reached an anonymous caller"


def test_info_behind_a_key_is_complete(make_client, tiny_model_dir):
    client = make_client(api_key=KEY)
    assert client.get("/info").status_code == 401
    info = client.get("/info", headers={"Authorization": f"Bearer {KEY}"})
    assert info.status_code == 200 and info.json()["model"]["source"] == str(tiny_model_dir), info.text


def test_a_load_error_names_the_folder_not_its_path(make_client, tmp_path):
    missing = tmp_path / "models" / "no-such-checkpoint"
    info = make_client(model=str(missing)).get("/info").json()
    assert not info["ready"] and "'no-such-checkpoint'" in info["load_error"], info
    assert str(tmp_path) not in json.dumps(info), info["load_error"]


def test_redaction_keeps_hub_ids_urls_and_plain_text():
    info = {"model": {"source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                      "description": "Wan2.1-architecture checkpoint Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                      "loras": ["/ckpt/run 7/step-5000.safetensors", "~/loras/cells.safetensors"],
                      "transformer_override": "./finetune/dit"},
            "load_error": "OSError: cannot fetch https://huggingface.co/org/name/resolve/main/x into /root/.cache/hf",
            "runtime": {"attention_reason": "SDPA flash/mem-efficient", "dtype": "float32"}, "limits": [1, 2.5, None]}
    assert redact_paths(info) == {
        "model": {"source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                  "description": "Wan2.1-architecture checkpoint Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                  "loras": ["step-5000.safetensors", "cells.safetensors"], "transformer_override": "dit"},
        "load_error": "OSError: cannot fetch https://huggingface.co/org/name/resolve/main/x into hf",
        "runtime": {"attention_reason": "SDPA flash/mem-efficient", "dtype": "float32"}, "limits": [1, 2.5, None]}


@pytest.fixture
def serve(monkeypatch, caplog):
    """Run ``microverse serve ARGS`` with ``os.execve`` recording instead of replacing the process; returns
    (the recorded command line and environment, the warnings logged)."""
    monkeypatch.delenv("MICROVERSE_API_KEY", raising=False)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # serve flushes logging before exec; keep pytest's
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((args, env)))

    def run(*args: str) -> tuple[list[str], dict[str, str], list[str]]:
        calls.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="microverse.cli"):
            result = CliRunner().invoke(main, ["serve", *args], catch_exceptions=False)
        assert result.exit_code == 0 and len(calls) == 1, result.output
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "microverse.cli" and r.levelno >= logging.WARNING]
        return *calls[0], warnings

    return run


def test_serve_warns_once_when_anyone_may_reach_it_without_a_key(serve):
    cmd, env, warnings = serve()  # the default bind, 0.0.0.0
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and "MICROVERSE_API_KEY" not in env
    assert len(warnings) == 1, warnings
    assert "0.0.0.0" in warnings[0] and "MICROVERSE_API_KEY" in warnings[0] and "127.0.0.1" in warnings[0]
    for host in ("192.168.1.5", "::", "myhost.example"):
        assert len(serve("--host", host)[2]) == 1, host


@pytest.mark.parametrize("args", [("--host", "127.0.0.1"), ("--host", "localhost"), ("--host", "::1"),
                                  ("--host", "127.0.0.2"), ("--api-key", KEY)])
def test_serve_is_quiet_on_loopback_or_with_a_key(serve, args):
    _, env, warnings = serve(*args)
    assert warnings == [], warnings
    assert env.get("MICROVERSE_API_KEY") == (KEY if "--api-key" in args else None)
