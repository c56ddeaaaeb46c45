"""Every Wan LoRA layout users bring (issue 17, item 1): each file, written here in its format's key layout, gives
the same transformer output as the same delta merged into a full DiT; malformed files are refused naming their
own keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from microverse.config import Settings
from microverse.engine import DiffusersEngine
from microverse.loading import CheckpointError, load_pipeline
from microverse.schemas import GenerationSpec

RANK, ALPHA = 4, 8.0  # alpha / rank = 2: a file that dropped alpha would be off by a factor of two
WAN_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip
"""Original Wan module names -> diffusers ones (written out here, independently of the code under test)."""


class Delta:
    """A random low-rank update of every Linear of every block: ``W += alpha / rank * B @ A`` (+ a bias delta)."""

    def __init__(self, transformer, seed: int = 0, alpha: float = ALPHA, bias: bool = False):
        g = torch.Generator().manual_seed(seed)
        modules = dict(transformer.named_modules())
        self.alpha = alpha
        self.parts = {}
        for i in range(transformer.config.num_layers):
            for wan, ours in WAN_TO_DIFFUSERS.items():
                lin = modules[f"blocks.{i}.{ours}"]
                a = torch.randn(RANK, lin.in_features, generator=g) * 0.3
                b = torch.randn(lin.out_features, RANK, generator=g) * 0.3
                db = torch.randn(lin.out_features, generator=g) * 0.1 if bias else None
                self.parts[(i, wan)] = (a, b, db)

    def merge_into(self, transformer) -> None:
        modules = dict(transformer.named_modules())
        with torch.no_grad():
            for (i, wan), (a, b, db) in self.parts.items():
                lin = modules[f"blocks.{i}.{WAN_TO_DIFFUSERS[wan]}"]
                lin.weight += self.alpha / RANK * (b @ a)
                if db is not None:
                    lin.bias += db

    def file(self, layout: str, transformer) -> dict[str, torch.Tensor]:
        """The delta as a state dict in ``layout``'s key names."""
        sd = {}
        for (i, wan), (a, b, db) in self.parts.items():
            if layout == "diffusers":  # alpha travels in the adapter metadata
                stem, down, up = f"transformer.blocks.{i}.{WAN_TO_DIFFUSERS[wan]}", "lora_A.weight", "lora_B.weight"
            elif layout == "wan":  # original Wan names, PEFT-style A/B, no alpha (alpha = rank)
                stem, down, up = f"diffusion_model.blocks.{i}.{wan}", "lora_A.weight", "lora_B.weight"
            elif layout in ("comfyui", "lightx2v"):
                stem, down, up = f"diffusion_model.blocks.{i}.{wan}", "lora_down.weight", "lora_up.weight"
            elif layout == "musubi":
                stem, down, up = f"lora_unet_blocks_{i}_{wan.replace('.', '_')}", "lora_down.weight", "lora_up.weight"
            elif layout == "microverse":  # upstream: no prefix, PEFT '.default', alpha = rank
                stem, down, up = f"blocks.{i}.{wan}", "lora_A.default.weight", "lora_B.default.weight"
            sd[f"{stem}.{down}"], sd[f"{stem}.{up}"] = a.clone(), b.clone()
            if layout in ("comfyui", "lightx2v", "musubi"):
                sd[f"{stem}.alpha"] = torch.tensor(self.alpha)
            if db is not None:
                sd[f"{stem}.diff_b"] = db.clone()
        if layout == "lightx2v":  # LightX2V files carry all-zero deltas of the q/k norms
            dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
            for i in range(transformer.config.num_layers):
                for attn in ("self_attn", "cross_attn"):
                    for norm in ("norm_q", "norm_k"):
                        sd[f"diffusion_model.blocks.{i}.{attn}.{norm}.diff"] = torch.zeros(dim)
        return sd


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    pipe = load_pipeline(Settings(model=str(tiny_model_dir), storage_dir=tmp_path_factory.mktemp("s"))).pipe
    return pipe.transformer


def forward(transformer, seed: int = 3) -> torch.Tensor:
    """The transformer's output on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(1, 6, cfg.text_dim, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([500]), text, return_dict=False)[0]


def save_lora(layout: str, delta: Delta, transformer, path):
    sd = delta.file(layout, transformer)
    if layout == "diffusers":
        from diffusers import WanPipeline

        WanPipeline.save_lora_weights(path, transformer_lora_layers={k.removeprefix("transformer."): v
                                                                    for k, v in sd.items()},
                                      transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": delta.alpha,
                                                                         "target_modules": sorted(
                                                                             set(WAN_TO_DIFFUSERS.values()))})
        return path
    path.mkdir()
    save_file(sd, str(path / f"{layout}.safetensors"))
    return path


LAYOUTS = {"diffusers": ALPHA, "wan": RANK, "comfyui": ALPHA, "musubi": ALPHA, "lightx2v": ALPHA, "microverse": RANK}
"""Each layout and the alpha its files carry (rank where the layout has no alpha)."""


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_lora_layout_equals_its_delta_merged_into_the_dit(layout, tiny_model_dir, base, tmp_path):
    delta = Delta(base, alpha=LAYOUTS[layout], bias=layout == "lightx2v")
    lora = save_lora(layout, delta, base, tmp_path / "lora")
    with_lora = load_pipeline(Settings(model=str(tiny_model_dir), lora=str(lora), storage_dir=tmp_path)).pipe
    merged = load_pipeline(Settings(model=str(tiny_model_dir), storage_dir=tmp_path)).pipe.transformer
    delta.merge_into(merged)
    got, want, plain = forward(with_lora.transformer), forward(merged), forward(base)
    assert (want - plain).abs().max() > 1e-2, "the delta must change the output for the test to mean anything"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_lightx2v_lora_generates_the_video_of_its_merged_full_dit(tiny_model_dir, base, tmp_path):
    """The issue's acceptance: ``.alpha`` and ``.diff_b`` keys, through the serving engine, against a full DiT."""
    delta = Delta(base, seed=5, bias=True)
    lora = save_lora("lightx2v", delta, base, tmp_path / "lora")
    merged = load_pipeline(Settings(model=str(tiny_model_dir), storage_dir=tmp_path)).pipe.transformer
    delta.merge_into(merged)
    merged.save_pretrained(tmp_path / "merged")
    spec = GenerationSpec(prompt="a cell divides", negative_prompt="", height=32, width=32, num_frames=5,
                          num_inference_steps=3, guidance_scale=5.0, seed=7, fps=8)

    def video(**settings) -> np.ndarray:
        s = Settings(model=str(tiny_model_dir), storage_dir=tmp_path, **settings)
        return DiffusersEngine.from_settings(s).generate([spec]).videos[0].astype(int)

    via_lora, via_dit, plain = video(lora=str(lora)), video(transformer=str(tmp_path / "merged")), video()
    assert np.abs(via_dit - plain).mean() > 1.0
    assert np.abs(via_lora - via_dit).max() <= 1, np.abs(via_lora - via_dit).max()


def write(tmp_path, sd) -> str:
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    return str(path)


def refused(tiny_model_dir, tmp_path, sd) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pipeline(Settings(model=str(tiny_model_dir), lora=write(tmp_path, sd), storage_dir=tmp_path))
    return str(info.value)


def test_an_unpaired_lora_a_is_refused_naming_the_files_key(tiny_model_dir, base, tmp_path):
    sd = Delta(base).file("comfyui", base)
    del sd["diffusion_model.blocks.1.cross_attn.v.lora_up.weight"]
    message = refused(tiny_model_dir, tmp_path, sd)
    assert "diffusion_model.blocks.1.cross_attn.v.lora_down.weight has no lora_B / lora_up partner" in message


def test_a_rank_mismatch_is_refused_naming_both_keys(tiny_model_dir, base, tmp_path):
    sd = Delta(base).file("wan", base)
    key = "diffusion_model.blocks.0.ffn.2.lora_B.weight"
    sd[key] = sd[key][:, :3].contiguous()
    message = refused(tiny_model_dir, tmp_path, sd)
    assert ("diffusion_model.blocks.0.ffn.2.lora_A.weight (4, 64) and diffusion_model.blocks.0.ffn.2.lora_B.weight "
            "(32, 3) do not share a rank") in message


def test_a_non_zero_norm_delta_and_a_dora_scale_are_refused_not_skipped(tiny_model_dir, base, tmp_path):
    sd = Delta(base).file("lightx2v", base)
    sd["diffusion_model.blocks.0.self_attn.norm_q.diff"] = torch.ones(32)
    assert "diffusion_model.blocks.0.self_attn.norm_q.diff (a full-weight delta" in refused(tiny_model_dir,
                                                                                          tmp_path, sd)
    sd = Delta(base).file("diffusers", base)
    sd["transformer.blocks.0.attn1.to_q.lora_magnitude_vector"] = torch.ones(32)
    assert "not LoRA weights: transformer.blocks.0.attn1.to_q.lora_magnitude_vector" in refused(
        tiny_model_dir, tmp_path, sd)


def test_an_alpha_without_its_pair_and_a_partial_musubi_block_are_refused(tiny_model_dir, base, tmp_path):
    sd = Delta(base).file("comfyui", base)
    sd["diffusion_model.blocks.0.self_attn.x.alpha"] = torch.tensor(4.0)
    assert "diffusion_model.blocks.0.self_attn.x.alpha (an alpha needs" in refused(tiny_model_dir, tmp_path, sd)
    sd = Delta(base).file("musubi", base)
    for key in [k for k in sd if k.startswith("lora_unet_blocks_0_self_attn_k.")]:
        del sd[key]
    message = refused(tiny_model_dir, tmp_path, sd)
    assert "musubi-layout keys could not be converted" in message and "blocks_0_self_attn_k" in message


def test_a_lora_for_another_model_size_names_the_files_module(tiny_model_dir, base, tmp_path):
    sd = Delta(base).file("comfyui", base)
    sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 999)
    message = refused(tiny_model_dir, tmp_path, sd)
    assert "in_features 999 != 32, diffusion_model.blocks.0.self_attn.q in the file" in message
