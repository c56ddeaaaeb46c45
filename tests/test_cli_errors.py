"""``microverse`` errors: one ``Error:`` line naming what to fix, exit 2 for usage and 1 for runtime errors,
a traceback only under ``--verbose``; ``--version``; ``bench`` at the model's own defaults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from microverse.cli import main
from microverse.tools.service_process import free_port

MICROVERSE = Path(sys.executable).with_name("microverse")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def failing_command():
    """A ``microverse boom`` command that raises the exception it is given (removed afterwards)."""
    raised: list[BaseException] = []

    @click.command("boom")
    def boom() -> None:
        raise raised[0]

    main.add_command(boom)
    yield raised
    main.commands.pop("boom")


def test_runtime_error_is_one_line_without_traceback_in_a_real_process(tmp_path, tiny_model_dir):
    lora = tmp_path / "garbage.safetensors"
    lora.write_bytes(b"not a safetensors file")
    proc = subprocess.run([str(MICROVERSE), "generate", "--model", str(tiny_model_dir), "--lora", str(lora),
                           "--device", "cpu", "cells", "-o", str(tmp_path / "a.mp4")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = _errors(proc.stderr)
    assert f"{lora}: not a readable safetensors file" in line and line.endswith("for the traceback)")
    assert not (tmp_path / "a.mp4").exists()


def test_nonexistent_model_names_the_path_and_what_was_expected(tmp_path):
    r = _invoke("generate", "--model", "/nonexistent", "x", "-o", str(tmp_path / "a.mp4"))
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    (line,) = _errors(r.stderr)
    assert "--model" in line and "no such folder: /nonexistent" in line and "Hugging Face id" in line
    export = tmp_path / "final"
    export.mkdir()
    (export / "microverse_checkpoint.json").write_text(json.dumps({"kind": "lora"}))
    r = _invoke("generate", "--model", str(export), "x")
    assert r.exit_code == 2 and f"pass it as --lora {export}" in r.stderr
    r = _invoke("info", "--lora", str(tmp_path / "missing.safetensors"))
    assert r.exit_code == 2 and "--lora" in r.stderr and "missing.safetensors" in r.stderr


def test_mis_keyed_lora_names_the_file_and_keys(tmp_path, tiny_model_dir):
    lora = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}, str(lora))
    r = _invoke("generate", "--model", str(tiny_model_dir), "--lora", str(lora), "--device", "cpu", "x",
                "-o", str(tmp_path / "a.mp4"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    (line,) = _errors(r.stderr)
    assert f"{lora}: keys that are not LoRA weights: blocks.0.attn1.to_q.weight" in line


def test_bad_setting_names_flag_and_variable():
    r = _invoke("generate", "--device", "gpu", "x")
    assert r.exit_code == 2
    (line,) = _errors(r.stderr)
    assert "--device / MICROVERSE_DEVICE" in line and "'gpu'" in line


def test_info_url_to_a_closed_port():
    port = free_port()
    r = _invoke("info", "--url", f"http://127.0.0.1:{port}")
    assert r.exit_code == 1
    assert _errors(r.stderr) == [f"Error: cannot reach http://127.0.0.1:{port}: connection refused"]
    r = _invoke("info", "--url", f"127.0.0.1:{port}")
    assert r.exit_code == 2 and "expected a URL such as http://127.0.0.1:3000" in r.stderr


def test_bad_config_override_and_eval_arguments(tmp_path):
    r = _invoke("train", "--config", "debug", "--set", "optim.lr=abc")
    assert r.exit_code == 2 and "Invalid value for --set: optim.lr: expected float, got 'abc'" in r.stderr
    r = _invoke("eval", "run", "--videos", str(tmp_path), "--model-name", "m", "--index", "abc")
    assert r.exit_code == 2 and "--index" in r.stderr and "task indices are integers" in r.stderr
    r = _invoke("eval", "run", "--videos", str(tmp_path), "--endpoint", "http://x", "--model-name", "m")
    assert r.exit_code == 2 and "give exactly one of --endpoint and --videos" in r.stderr


def test_unexpected_errors_verbose_and_interrupt(failing_command):
    failing_command.append(ValueError("the thing\nis wrong"))
    r = _invoke("boom")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert _errors(r.stderr) == ["Error: the thing is wrong (run `microverse --verbose ...` for the traceback)"]
    r = _invoke("--verbose", "boom")
    assert r.exit_code == 1 and "Traceback (most recent call last)" in r.stderr and "ValueError" in r.stderr
    assert _errors(r.stderr) == ["Error: the thing is wrong"]
    failing_command[0] = KeyError("x")
    assert _errors(_invoke("boom").stderr)[0].startswith("Error: KeyError: 'x'")
    failing_command[0] = KeyboardInterrupt()
    r = _invoke("boom")
    assert r.exit_code == 130 and r.stderr == ""


def test_a_missing_extra_names_the_extra_to_install(failing_command):
    failing_command.append(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"))
    r = _invoke("boom")
    assert r.exit_code == 1
    assert _errors(r.stderr)[0].startswith(
        "Error: this command needs the eval extra (matplotlib is missing): pip install 'microverse[eval]'"
    )


def test_version():
    r = _invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"microverse, version {metadata.version('microverse')}"


@pytest.fixture
def small_defaults_model(tmp_path, tiny_model_dir) -> Path:
    """The tiny pipeline with defaults of 32x32, 5 frames, 2 steps in its ``microverse_defaults.json``."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    defaults = json.loads((model / "microverse_defaults.json").read_text())
    defaults.update(height=32, width=32, num_frames=5, num_inference_steps=2)
    (model / "microverse_defaults.json").write_text(json.dumps(defaults))
    return model


def test_bench_uses_the_model_defaults(tmp_path, small_defaults_model):
    out = tmp_path / "bench.json"
    r = _invoke("bench", "--model", str(small_defaults_model), "--device", "cpu", "--presets", "exact",
                "--repeats", "1", "--warmup-steps", "1", "-o", str(out))
    assert r.exit_code == 0, r.output
    shape = json.loads(out.read_text())["shape"]
    assert (shape["height"], shape["width"], shape["num_frames"], shape["steps"]) == (32, 32, 5, 2)


def test_bench_refuses_shapes_the_model_cannot_take(tmp_path, small_defaults_model):
    r = _invoke("bench", "--model", str(small_defaults_model), "--device", "cpu", "--height", "1024",
                "-o", str(tmp_path / "b.json"))
    assert r.exit_code == 2
    assert "Invalid value for --height: height 1024 exceeds what this model supports (512)" in r.stderr
    r = _invoke("bench", "--num-frames", "10")
    assert r.exit_code == 2 and "--num-frames" in r.stderr and "4k+1" in r.stderr
    r = _invoke("bench", "--presets", "exact,fsat")
    assert r.exit_code == 2 and "unknown preset 'fsat'" in r.stderr
    r = _invoke("bench", "--set", "fast_step_ratioo=0.3")
    assert r.exit_code == 2 and "did you mean fast_step_ratio?" in r.stderr
    assert not (tmp_path / "b.json").exists()
