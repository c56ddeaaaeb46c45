"""Checks of the ``--model`` / ``--lora`` / ``--transformer`` options shared by ``microverse generate``, ``info``
and ``bench``: a path that cannot load is a usage error naming the option, before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import click


def check_checkpoint_options(model: str | None = None, loras: tuple[str, ...] | list[str] = (),
                             transformer: str | None = None) -> None:
    """Refuse ``--model`` / ``--lora`` / ``--transformer`` paths that cannot load, before anything loads."""
    if model:
        path = Path(model).expanduser()
        if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            raise click.BadParameter(
                f"no such folder: {model} (expected a diffusers-format Wan2.1 pipeline folder, or a Hugging Face id "
                "such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers)", param_hint="--model")
        if path.is_file() or (path.is_dir() and not (path / "model_index.json").is_file()):
            raise click.BadParameter(
                f"{model} is not a diffusers pipeline folder (no model_index.json){_export_hint(path)}",
                param_hint="--model")
    for lora in loras:
        if not Path(lora).expanduser().exists():
            raise click.BadParameter(
                f"no such file or folder: {lora} (expected a LoRA .safetensors file or export folder)",
                param_hint="--lora")
    if transformer and not Path(transformer).expanduser().exists():
        raise click.BadParameter(f"no such file or folder: {transformer} (expected a diffusers transformer folder or "
                                 "a .safetensors file in original Wan keys)", param_hint="--transformer")


def _export_hint(path: Path) -> str:
    """How to pass a ``microverse train`` export folder that was given as ``--model``."""
    try:
        kind = json.loads((path / "microverse_checkpoint.json").read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if kind == "lora":
        return f"; it is a LoRA export: pass it as --lora {path} on top of its base --model"
    return f"; it is a fine-tuned DiT export: pass --transformer {path / 'transformer'} on top of its base --model"
