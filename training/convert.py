"""Checkpoint formats: diffusers/PEFT (what the service loads) and upstream MicroVerse (original Wan keys).

Upstream -> diffusers reuses diffusers' ``convert_wan_transformer_to_diffusers``; diffusers ->
upstream is its inverse (:func:`diffusers_to_original_keys`), checked by a round-trip test.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

#: diffusers -> original renames, undoing ``TRANSFORMER_KEYS_RENAME_DICT`` (applied in order).
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".scale_shift_table", ".modulation"),
    ("proj_out", "head.head"),
)
_NORM_SWAP = re.compile(r"^(blocks\.\d+\.)norm([23])\.")


def diffusers_key_to_original(key: str) -> str:
    """``blocks.0.attn1.to_q.weight`` -> ``blocks.0.self_attn.q.weight`` (norm2/norm3 swapped back)."""
    if key == "scale_shift_table":
        return "head.modulation"
    for old, new in _TO_ORIGINAL:
        key = key.replace(old, new)
    return _NORM_SWAP.sub(lambda m: f"{m.group(1)}norm{'3' if m.group(2) == '2' else '2'}.", key)


def diffusers_to_original_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``WanTransformer3DModel`` state dict in original Wan key names."""
    return {diffusers_key_to_original(k): v for k, v in state_dict.items()}


def original_to_diffusers_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-Wan DiT state dict in diffusers names (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state_dict))


_LORA_SUFFIX = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_[AB])(?:\.default)?\.weight$")


def lora_diffusers_to_upstream(
    state_dict: dict[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """diffusers LoRA (``transformer.blocks.0.attn1.to_q.lora_A.weight``) -> upstream
    (``blocks.0.self_attn.q.lora_A.default.weight``). Upstream uses alpha = rank, so a different
    alpha is folded into ``lora_B``."""
    out = {}
    for module, ab, value in _original_lora_modules(state_dict):
        if ab == "lora_B" and alpha != rank:
            value = value * (alpha / rank)
        out[f"{module}.{ab}.default.weight"] = value.contiguous()
    return out


def _original_lora_modules(state_dict: dict[str, torch.Tensor]):
    """``(original Wan module name, "lora_A" or "lora_B", tensor)`` for each weight of a diffusers LoRA."""
    for key, value in state_dict.items():
        m = _LORA_SUFFIX.match(key.removeprefix("transformer."))
        if m is None:
            raise ValueError(f"not a LoRA weight: {key}")
        yield diffusers_key_to_original(m["module"] + ".weight").removesuffix(".weight"), m["ab"], value


def lora_diffusers_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers LoRA (``transformer.blocks.0.attn1.to_q.lora_A.weight``, unscaled A and B) -> the kohya /
    musubi-tuner layout ComfyUI loads for Wan (``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``lora_up``,
    and the ``.alpha`` each module is scaled by, over its rank); diffusers reads it back as well."""
    out = {}
    for module, ab, value in _original_lora_modules(state_dict):
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if ab == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=value.dtype)
    return out


def lora_upstream_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream LoRA keys -> diffusers PEFT keys with the ``transformer.`` prefix (alpha = rank)."""
    parsed = {}
    for key in state_dict:
        m = _LORA_SUFFIX.match(key.removeprefix("diffusion_model.").removeprefix("pipe.dit."))
        if m is None:
            raise ValueError(f"not a LoRA weight: {key}")
        parsed[key] = (m["module"], m["ab"])
    modules = sorted({module for module, _ in parsed.values()})
    renamed = original_to_diffusers_keys({f"{module}.weight": module for module in modules})
    to_diffusers = {module: new.removesuffix(".weight") for new, module in renamed.items()}
    return {f"transformer.{to_diffusers[module]}.{ab}.weight": state_dict[key] for key, (module, ab) in parsed.items()}


def save_diffusers_lora(
    transformer_lora_state: dict[str, torch.Tensor], out_dir: str | Path, rank: int, alpha: float, targets
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (readable by ``WanPipeline.load_lora_weights``).

    ``alpha / rank`` is folded into ``lora_B`` and the metadata says alpha = rank, so loaders that
    ignore the metadata apply the same scale. Keys may be with or without ``transformer.``."""
    from diffusers import WanPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    for key, value in transformer_lora_state.items():
        value = value.detach().cpu()
        if ".lora_B." in key and alpha != rank:
            value = value * (alpha / rank)
        layers[key.removeprefix("transformer.")] = value.contiguous()
    WanPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": sorted(targets)},
    )
    return out_dir / "pytorch_lora_weights.safetensors"


def read_diffusers_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """Load a diffusers LoRA file or folder: (state dict with ``transformer.`` keys, rank, alpha)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
    alpha = rank
    if "lora_adapter_metadata" in meta:
        alpha = json.loads(meta["lora_adapter_metadata"]).get("transformer.lora_alpha", rank)
    return state, rank, alpha


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, base: str | None = None) -> Path:
    """Convert between formats; ``to`` is ``upstream`` or ``diffusers``.

    LoRA: diffusers ``pytorch_lora_weights.safetensors`` (file or folder) <-> upstream
    ``step-N.safetensors``. Full: diffusers transformer folder <-> one safetensors in original keys;
    upstream -> diffusers needs ``base`` (a Wan pipeline or transformer folder) for the config.
    """
    from diffusers import WanTransformer3DModel

    src, dst = Path(src), Path(dst)
    if to == "upstream":
        if src.is_dir() and (src / "config.json").exists():
            state = diffusers_to_original_keys(WanTransformer3DModel.from_pretrained(src).state_dict())
        else:
            lora, rank, alpha = read_diffusers_lora(src)
            state = lora_diffusers_to_upstream(lora, rank, alpha)
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
        logger.info("wrote upstream checkpoint %s (%d tensors)", dst, len(state))
        return dst
    if to != "diffusers":
        raise ValueError(f"unknown target format {to!r}")
    state = load_file(str(src))
    if any("lora_A" in k for k in state):
        lora = lora_upstream_to_diffusers(state)
        rank = next(v.shape[0] for k, v in lora.items() if "lora_A" in k)
        targets = {k.split(".lora_")[0].split(".", 3)[-1] for k in lora}
        return save_diffusers_lora(lora, dst, rank, rank, targets).parent
    if base is None:
        raise ValueError("converting a full upstream checkpoint needs --base (a Wan pipeline or transformer folder)")
    base_path = Path(base)
    subfolder = "transformer" if (base_path / "transformer").is_dir() or not base_path.exists() else None
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(base, subfolder=subfolder))
    model.load_state_dict(original_to_diffusers_keys(state), strict=True)
    model.save_pretrained(dst)
    logger.info("wrote diffusers transformer %s", dst)
    return dst
