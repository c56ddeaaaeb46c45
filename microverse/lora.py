"""LoRA files in every layout Wan users bring, read through diffusers' own Wan LoRA conversion.

Layouts (detected from the keys):
- **diffusers / PEFT**: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (or bare module names, or
  ``base_model.model.``), alpha from the file's ``lora_adapter_metadata`` when it has one;
- **original Wan / ComfyUI / LightX2V**: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` (or
  ``lora_A``), with ``.alpha``, ``.diff_b`` (bias deltas) and ``.diff`` keys;
- **kohya / musubi-tuner**: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` with ``.alpha``;
- **upstream MicroVerse / DiffSynth**: bare original names with ``.lora_A.default.weight`` (trained with
  alpha = rank: scale 1), mapped to the original Wan layout and converted like it.

Diffusers folds ``alpha / rank`` into the weights and turns ``.diff_b`` into LoRA biases. What it would skip
without a word is refused here instead, before any conversion and naming the file's own keys: a ``lora_A``
without its ``lora_B`` (or the reverse), A/B ranks that differ, an ``.alpha`` of no pair, a full-weight
``.diff`` (only all-zero norm deltas, which LightX2V files carry, are skipped), DoRA scales and any other key.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SUFFIXES = {
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".lora_A.weight": "down",
    ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_B.bias": "bias",
    ".diff_b": "bias", ".alpha": "alpha", ".diff": "diff",
}  # fmt: skip
"""Key endings of a LoRA file and the role of each (longest first where one ends another)."""
MUSUBI_NAME = re.compile(r"^blocks_(\d+)_(self_attn|cross_attn|ffn)_(\w+)$")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be used as it is; the message names its keys."""


def lora_format(keys: list[str]) -> str:
    """``diffusers``, ``wan`` (original Wan, ComfyUI, LightX2V), ``musubi`` (kohya) or ``microverse``."""
    if any(k.startswith("diffusion_model.") for k in keys):
        return "wan"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(".default." in k for k in keys) or any(re.match(r"^blocks\.\d+\.(self_attn|cross_attn|ffn)\.", k)
                                                  for k in keys):
        return "microverse"
    return "diffusers"


def check_lora_file(sd: dict[str, torch.Tensor]) -> None:
    """Refuse what the conversion would drop or choke on (module docstring), naming the file's keys."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in sd:
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
        else:
            groups.setdefault(key[: -len(suffix)], {})[SUFFIXES[suffix]] = key
    if unknown:
        raise LoraFormatError(f"keys that are not LoRA weights: {format_keys(unknown)}")
    problems = [p for stem, roles in groups.items() for p in _group_problems(sd, stem, roles)]
    if problems:
        raise LoraFormatError(format_keys(problems, sep="; "))


def format_keys(keys: list[str], limit: int = 12, sep: str = ", ") -> str:
    """The first ``limit`` keys, and how many more."""
    shown = sep.join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _group_problems(sd: dict[str, torch.Tensor], stem: str, roles: dict[str, str]) -> list[str]:
    down, up = roles.get("down"), roles.get("up")
    if (down is None) != (up is None):
        return [f"{down or up} has no {'lora_B / lora_up' if up is None else 'lora_A / lora_down'} partner"]
    problems = []
    if down is not None:
        a, b = sd[down], sd[up]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{down} {tuple(a.shape)} and {up} {tuple(b.shape)} do not share a rank")
    if "alpha" in roles and (down is None or sd[roles["alpha"]].numel() != 1):
        problems.append(f"{roles['alpha']} (an alpha needs one value and its lora_A / lora_B pair)")
    if "diff" in roles:
        diff = sd[roles["diff"]]
        head_delta = stem.endswith("head.head") and "bias" in roles  # diffusers' reading: a delta of the output head
        if not head_delta and not ("norm" in stem and not diff.any()):
            problems.append(f"{roles['diff']} (a full-weight delta; only all-zero norm deltas can be skipped)")
    elif "bias" in roles and down is None:
        problems.append(f"{roles['bias']} (a bias delta without its lora_A / lora_B pair)")
    return problems


def to_diffusers(sd: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """The LoRA as diffusers keys ``transformer.<module>.lora_{A,B}.<weight|bias>`` (alpha folded in), converted
    in memory (the file is read once). :class:`LoraFormatError` on a malformed file."""
    from diffusers import WanPipeline

    check_lora_file(sd)
    fmt = lora_format(list(sd))
    if fmt == "microverse":
        sd = {"diffusion_model." + k.replace(".default.", "."): v for k, v in sd.items()}
    try:
        converted = WanPipeline.lora_state_dict(dict(sd))
    except (KeyError, ValueError, IndexError, RuntimeError) as exc:
        raise LoraFormatError(f"its {fmt}-layout keys could not be converted ({type(exc).__name__}: {exc})") from exc
    out = {}
    for key, value in converted.items():
        k = key.removeprefix("base_model.model.").replace(".default.", ".")
        out[k if k.startswith("transformer.") else f"transformer.{k}"] = value
    logger.info("LoRA %s: %s layout, %d tensors -> %d diffusers tensors", file, fmt, len(sd), len(out))
    return out


def user_names(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Diffusers module name -> the module's name in the file (for errors after the conversion)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    names = {}
    for key in sd:
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        stem = key[: -len(suffix)]
        original = stem.removeprefix("diffusion_model.").removeprefix("lora_unet_")
        musubi = MUSUBI_NAME.match(original)
        if musubi:
            original = f"blocks.{musubi[1]}.{musubi[2]}.{musubi[3]}"
        try:
            (converted,) = convert_wan_transformer_to_diffusers({original + ".weight": None}).keys()
        except (ValueError, KeyError):
            continue
        names[converted.removesuffix(".weight")] = stem
    return names
