"""Typed config overrides: ``--set`` values and YAML files are validated against the dataclass field types."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

from microverse.cli import main
from training.cli import train_group
from training.config import ConfigError, load_config


def test_float_override_is_a_float():
    cfg = load_config("debug", ["optim.lr=5e-5"])  # YAML 1.1 alone reads "5e-5" as a string
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 5e-05


def test_wrong_type_is_refused_naming_the_field_and_type():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'abc'") as info:
        load_config("debug", ["optim.lr=abc"])
    assert info.value.key == "optim.lr"
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        load_config("debug", ["max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"optim\.betas: expected tuple\[float, float\]"):
        load_config("debug", ["optim.betas=[0.9, 0.99, 0.999]"])
    with pytest.raises(ConfigError, match="optim is a section"):
        load_config("debug", ["optim=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("debug", ["optim.lr"])


def test_unknown_keys_are_refused_with_suggestions():
    with pytest.raises(ConfigError, match=r"unknown config field optim\.lrr; did you mean optim\.lr\?") as info:
        load_config("debug", ["optim.lrr=1e-4"])
    assert info.value.key == "optim.lrr" and isinstance(info.value, KeyError)
    with pytest.raises(ConfigError, match=r"unknown config field lr; did you mean optim\.lr\?"):
        load_config("debug", ["lr=1e-4"])  # the section forgotten
    with pytest.raises(ConfigError, match="OptimConfig has lr, weight_decay"):
        load_config("debug", ["optim.nothing_like_it=1"])
    with pytest.raises(ConfigError, match=r"neither a registered config .* did you mean debug"):
        load_config("debg")


def test_tuple_dict_optional_and_string_fields():
    cfg = load_config("debug", [
        "data.buckets=[[9, 32, 32], [5, 16, 48]]", "validation_prompts=[cells dividing, blood flow]",
        "validation_shape=[5, 16, 16]", "ema_decay=0.999", "keep_checkpoints=null", "name=2024",
        "data.repeat_by={process: {blood_flow: 3}}", "model.gradient_checkpointing=true",
    ])  # fmt: skip
    assert cfg.data.buckets == ((9, 32, 32), (5, 16, 48))
    assert cfg.validation_prompts == ("cells dividing", "blood flow") and cfg.validation_shape == (5, 16, 16)
    assert cfg.ema_decay == 0.999 and cfg.keep_checkpoints is None
    assert cfg.name == "2024" and cfg.data.repeat_by == {"process": {"blood_flow": 3}}
    assert cfg.model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match=r"data\.buckets: expected tuple\[tuple\[int, int, int\], \.\.\.\]"):
        load_config("debug", ["data.buckets=[[9, 32]]"])


def test_yaml_files_go_through_the_same_validation(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("base: debug\noptim:\n  lr: 5e-5\ndata:\n  buckets: [[5, 16, 16]]\n")
    cfg = load_config(str(good))
    assert cfg.optim.lr == 5e-05 and isinstance(cfg.optim.lr, float) and cfg.data.buckets == ((5, 16, 16),)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  bucket: [[5, 16, 16]]\n")
    with pytest.raises(ConfigError, match=r"data\.bucket; did you mean data\.buckets\b"):
        load_config(str(typo))
    based = tmp_path / "based.yaml"
    based.write_text("base: lora-13b\n")
    with pytest.raises(ConfigError, match="unknown base config 'lora-13b'"):
        load_config(str(based))


def test_cli_refuses_bad_overrides_naming_the_option():
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--config", "debug", "--set", "optim.lr=abc"])
    assert r.exit_code == 2
    assert "--set" in r.stderr and "optim.lr: expected float, got 'abc'" in r.stderr and "Traceback" not in r.stderr
    r = runner.invoke(main, ["train", "--config", "debg"])
    assert r.exit_code == 2 and "--config" in r.stderr and "did you mean debug" in r.stderr
    r = runner.invoke(train_group, ["show-config", "debug", "--set", "optim.lr=5e-5",
                                    "--set", "data.buckets=[[5,16,16]]"])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["optim"]["lr"] == 5e-05 and shown["data"]["buckets"] == [[5, 16, 16]]
    r = runner.invoke(train_group, ["show-config", "debug", "--set", "optim.lrr=1"])
    assert r.exit_code == 2 and "did you mean optim.lr?" in r.stderr


def test_train_runs_with_a_float_override(tmp_path, monkeypatch, tiny_model, tiny_dataset):
    """``microverse train --config debug --set optim.lr=5e-5``: the debug config (outputs/tiny-wan, data/debug)
    trains one step with the float learning rate in its optimizer."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "tiny-wan").symlink_to(tiny_model)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "debug").symlink_to(tiny_dataset)
    r = CliRunner().invoke(main, ["train", "--config", "debug", "--set", "optim.lr=5e-5", "--until-step", "1"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "outputs" / "debug"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 5e-05
    ckpt = run / "checkpoints" / "step-0000001"
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=False)
    assert [group["lr"] for group in optimizer["param_groups"]] == [5e-05]


def test_train_refuses_a_missing_dataset_or_base_model(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["train", "--config", "debug"])
    assert r.exit_code == 2 and "data.dataset=data/debug: no metadata.json there" in r.stderr
    r = CliRunner().invoke(main, ["train", "--config", "debug", "--set", f"data.dataset={tiny_dataset}"])
    assert r.exit_code == 2 and "model.pretrained=outputs/tiny-wan: no such folder" in r.stderr
    assert "save_tiny_pipeline('outputs/tiny-wan')" in r.stderr and not (tmp_path / "outputs" / "debug").exists()
