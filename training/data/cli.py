"""``microverse data`` commands: each pipeline stage, ``build`` (all stages) and ``train-classifier``."""

from __future__ import annotations

import dataclasses
import json
import logging

import click

from training.data.pipeline import STAGES, DataPipelineConfig, build_dataset

logger = logging.getLogger(__name__)


def _pipeline_options(fn):
    """One click option per :class:`DataPipelineConfig` field (``--input-dir``, ``--max-frames``, ...)."""
    defaults = DataPipelineConfig()
    for f in reversed(dataclasses.fields(DataPipelineConfig)):
        name = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "buckets":
            fn = click.option(name, multiple=True, default=[f"{h}x{w}" for h, w in default], show_default=True,
                              help="HEIGHTxWIDTH training bucket (repeat).")(fn)  # fmt: skip
        else:
            kind = type(default) if default is not None else str
            fn = click.option(name, type=kind, default=default, show_default=True)(fn)
    return fn


def _config(kwargs: dict) -> DataPipelineConfig:
    kwargs = dict(kwargs)
    kwargs["buckets"] = tuple(tuple(int(v) for v in b.lower().split("x")) for b in kwargs["buckets"])
    return DataPipelineConfig(**kwargs)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stage_command(name: str):
    stage = STAGES[name]

    @_pipeline_options
    def command(**kwargs):
        _setup_logging()
        click.echo(json.dumps({name: stage(_config(kwargs))}, indent=1))

    command.__doc__ = stage.__doc__.splitlines()[0]
    return click.command(name)(command)


def register(group: click.Group) -> None:
    """Add the data commands to ``group``."""
    for name in STAGES:
        group.add_command(_stage_command(name))

    @group.command("build")
    @_pipeline_options
    def build(**kwargs):
        """Run every stage (shots, clips, motion, dedup, classify, caption, metadata); resumable."""
        _setup_logging()
        click.echo(json.dumps(build_dataset(_config(kwargs)), indent=1))

    @group.command("train-classifier")
    @click.argument("labelled_dir", type=click.Path(exists=True, file_okay=False))
    @click.argument("out_dir", type=click.Path())
    @click.option("--positive", default="keep", show_default=True, help="Label (sub-folder) of wanted clips.")
    @click.option("--base", help="Pretrained VideoMAE (HF id or folder); default: tiny random init.")
    @click.option("--num-frames", default=16, show_default=True)
    @click.option("--image-size", default=224, show_default=True, help="Frame size of a tiny model.")
    @click.option("--epochs", default=20, show_default=True)
    @click.option("--lr", default=1e-3, show_default=True)
    @click.option("--holdout", default=0.25, show_default=True)
    @click.option("--threshold", default=0.5, show_default=True)
    @click.option("--seed", default=0, show_default=True)
    def train_classifier_cmd(labelled_dir, out_dir, threshold, **kwargs):
        """Fine-tune the VideoMAE filter on LABELLED_DIR/<label>/*.mp4; prints held-out precision/recall."""
        from training.data.classifier import ClassifierConfig, train_classifier

        _setup_logging()
        click.echo(json.dumps(train_classifier(labelled_dir, out_dir, ClassifierConfig(**kwargs), threshold), indent=1))
