"""``microverse train`` CLI: config run with --until-step and resume, export, export-bento."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from training_test_media import debug_config

from training.cli import train_group
from training.config import save_config


def test_train_until_step_then_resume_export_and_bento(tmp_path, tiny_model, tiny_dataset, lora_run, monkeypatch):
    run = tmp_path / "run"
    cfg = debug_config(run, tiny_model, tiny_dataset, max_steps=6, checkpoint_every=4, validation_prompts=())
    save_config(cfg, tmp_path / "run.yaml")
    runner = CliRunner()
    r = runner.invoke(train_group, ["--config", str(tmp_path / "run.yaml"), "--until-step", "3"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003"]
    assert not (run / "final").exists()
    r = runner.invoke(train_group, ["--config", str(tmp_path / "run.yaml"), "--set", "max_steps=6"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().endswith("final")
    steps = [p.name for p in sorted((run / "checkpoints").iterdir())]
    assert steps == ["step-0000003", "step-0000004", "step-0000006"]

    r = runner.invoke(train_group, ["export", str(run), str(tmp_path / "up"), "--format", "upstream"])
    assert r.exit_code == 0, r.output
    upstream = load_file(str(tmp_path / "up" / "step-6.safetensors"))
    assert all(k.endswith(".default.weight") and k.startswith("blocks.") for k in upstream)

    r = runner.invoke(train_group, ["export", str(run / "checkpoints" / "step-0000004"), str(tmp_path / "d4")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d4" / "microverse_checkpoint.json").read_text())["step"] == 4

    import bentoml

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    r = runner.invoke(train_group, ["export-bento", str(lora_run), "--name", "microverse-lora", "--label", "lab=test"])
    assert r.exit_code == 0, r.output
    tag = r.stdout.strip().splitlines()[-1]
    model = bentoml.models.get(tag)
    assert model.info.labels == {"kind": "lora", "lab": "test"} and model.info.metadata["step"] == 200
    stored = load_file(model.path_of("pytorch_lora_weights.safetensors"))
    exported = load_file(str(lora_run / "final" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(stored[k], exported[k]) for k in exported)


def test_benchmark_command_cpu(tmp_path):
    args = ["--size", "tiny", "--shape", "9x32x32", "--steps", "2", "--lora-rank", "4"]
    r = CliRunner().invoke(train_group, ["benchmark", *args, "--out", str(tmp_path / "bench.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["latent_shape"] == [1, 4, 3, 4, 4] and result["tokens"] == 12
    assert 0 < result["trainable_parameters"] < result["parameters"] and result["seconds_per_step"] > 0
