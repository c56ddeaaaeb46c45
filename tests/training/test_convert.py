"""Key conversions between diffusers and upstream (original Wan) names, LoRA and full."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from training.cli import train_group
from training.convert import (
    diffusers_to_original_keys,
    lora_diffusers_to_upstream,
    lora_upstream_to_diffusers,
    original_to_diffusers_keys,
    read_diffusers_lora,
    save_diffusers_lora,
)


def _transformer():
    from microverse.tools.tiny import TinyWanConfig, build_tiny_pipeline

    return build_tiny_pipeline(TinyWanConfig()).transformer


def test_full_round_trip_through_diffusers_converter():
    state = _transformer().state_dict()
    original = diffusers_to_original_keys(state)
    for key in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.bias", "blocks.0.ffn.0.weight",
                "blocks.0.ffn.2.bias", "head.head.weight", "head.modulation", "blocks.0.modulation",
                "blocks.0.norm3.weight", "time_embedding.0.weight", "text_embedding.2.bias",
                "time_projection.1.weight", "patch_embedding.weight"):  # fmt: skip
        assert key in original, key
    assert "blocks.0.norm2.weight" not in original  # diffusers norm2 (cross-attn norm) is original norm3
    back = original_to_diffusers_keys(original)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def test_lora_round_trip_and_alpha_folding(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from training.config import DIFFUSERS_LORA_TARGETS

    transformer = _transformer()
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=list(DIFFUSERS_LORA_TARGETS), init_lora_weights="gaussian")
    )
    lora = get_peft_model_state_dict(transformer)
    up = lora_diffusers_to_upstream(lora, rank=4, alpha=8)
    assert "blocks.0.self_attn.q.lora_A.default.weight" in up and "blocks.1.cross_attn.o.lora_B.default.weight" in up
    assert "blocks.0.ffn.0.lora_A.default.weight" in up and "blocks.0.ffn.2.lora_B.default.weight" in up
    assert torch.equal(up["blocks.0.self_attn.q.lora_B.default.weight"], 2 * lora["blocks.0.attn1.to_q.lora_B.weight"])
    back = lora_upstream_to_diffusers(up)
    assert back.keys() == {f"transformer.{k}" for k in lora}
    assert torch.equal(back["transformer.blocks.0.attn1.to_q.lora_A.weight"], lora["blocks.0.attn1.to_q.lora_A.weight"])

    # CLI: diffusers file -> upstream -> diffusers keeps the effective update B @ A.
    save_diffusers_lora(lora, tmp_path / "d", rank=4, alpha=8, targets=DIFFUSERS_LORA_TARGETS)
    runner = CliRunner()
    upstream = str(tmp_path / "step-7.safetensors")
    r = runner.invoke(train_group, ["convert", str(tmp_path / "d"), upstream, "--to", "upstream"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(train_group, ["convert", upstream, str(tmp_path / "d2"), "--to", "diffusers"])
    assert r.exit_code == 0, r.output
    state, rank, alpha = read_diffusers_lora(tmp_path / "d2")
    assert (rank, alpha) == (4, 4)
    original, _, _ = read_diffusers_lora(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


def test_full_upstream_cli_round_trip(tmp_path, tiny_model):
    r = CliRunner().invoke(
        train_group, ["convert", str(tiny_model / "transformer"), str(tmp_path / "dit.safetensors"), "--to", "upstream"]
    )
    assert r.exit_code == 0, r.output
    assert "head.head.weight" in load_file(str(tmp_path / "dit.safetensors"))
    dit = str(tmp_path / "dit.safetensors")
    r = CliRunner().invoke(
        train_group, ["convert", dit, str(tmp_path / "dit"), "--to", "diffusers", "--base", str(tiny_model)]
    )
    assert r.exit_code == 0, r.output
    a = load_file(str(tmp_path / "dit" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "junk.safetensors"))
    junk = str(tmp_path / "junk.safetensors")
    r = CliRunner().invoke(train_group, ["convert", junk, str(tmp_path / "j"), "--to", "diffusers"])
    assert r.exit_code != 0
