"""The demo-model recipe (issue 5): every stage end to end at debug size, resume, and the reproduction check."""

from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from microverse.loading import DEFAULTS_FILE, ModelDefaults, read_defaults
from microverse.sources import engine_generate, model_runner
from training.cli import main as training_main
from training.demo import (
    METRICS_FILE,
    build_demo,
    compare_metrics,
    comparison_notes,
    demo_debug_config,
    vae_recipe_change,
    write_defaults,
)


def test_demo_recipe_runs_every_stage_and_resumes(tmp_path):
    cfg = demo_debug_config()
    metrics = build_demo(cfg, tmp_path, model_runner(), reference=None)
    model = tmp_path / "model"
    assert set(metrics["timings"]) == {"data", "vae", "dit", "eval"}
    assert metrics["training"]["steps"] == cfg.train_steps
    assert set(metrics["physics_accuracy"]) == {"model", "ceiling", "vae", "floor"}
    assert metrics["physics_accuracy"]["ceiling"]["overall"] == 1.0
    assert json.loads((model / METRICS_FILE).read_text())["acceptance"] == metrics["acceptance"]
    assert (model / "README.md").read_text().startswith("# microverse-demo-debug")
    rows = json.loads((tmp_path / "data" / "metadata.json").read_text())
    assert any("microscopy" not in r["prompt"] for r in rows) and any("microscopy" in r["prompt"] for r in rows)
    frames = engine_generate(model, cfg.size, cfg.frames, cfg.steps)("a cell divides into two daughter cells", 0)
    assert frames.shape == (cfg.frames, cfg.size, cfg.size, 3)
    # A re-run reuses every finished stage (no retraining) and lands on the same metrics.
    before = (tmp_path / "train" / "loss.csv").read_text()
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(model / METRICS_FILE, shipped)
    again = build_demo(cfg, tmp_path, model_runner(), reference=shipped)
    assert (tmp_path / "train" / "loss.csv").read_text() == before
    assert again["timings"] == metrics["timings"]
    assert again["reproduction"]["problems"] == []


def test_compare_metrics_names_what_is_out_of_tolerance():
    ref = {"acceptance": {"mitosis_one_then_two": {"passed": 9, "n": 10, "ok": True}},
           "physics_accuracy": {"model": {"mitosis": 0.9, "overall": 0.8}},
           "training": {"loss_last": 0.20}}  # fmt: skip
    same = json.loads(json.dumps(ref))
    assert compare_metrics(same, ref) == []
    worse = json.loads(json.dumps(ref))
    worse["acceptance"]["mitosis_one_then_two"] = {"passed": 6, "n": 10, "ok": False}
    worse["physics_accuracy"]["model"]["mitosis"] = 0.2  # a 10-case row: reported, not compared
    assert compare_metrics(worse, ref) == ["mitosis_one_then_two: 6/10 vs reference 9/10"]
    worse["physics_accuracy"]["model"]["overall"] = 0.6
    worse["training"]["loss_last"] = np.float64(0.25)
    problems = compare_metrics(worse, ref)
    assert len(problems) == 3 and problems[1] == "overall physics accuracy: 0.60 vs reference 0.80"



def test_the_final_loss_is_compared_only_between_models_of_the_same_vae_recipe():
    """The DiT's loss is measured in the VAE's latent space: with another VAE recipe it is reported, not compared."""
    ref = {"acceptance": {}, "physics_accuracy": {"model": {"overall": 0.6}}, "training": {"loss_last": 0.28},
           "config": {"vae": {"seed": 0, "steps": 1000, "data": "a", "size": 64}}}
    new = json.loads(json.dumps(ref))
    new["training"]["loss_last"] = 0.34
    new["config"]["vae"].update(data="b", size=48)  # folders and sizes are filled in by the recipe: no change
    assert vae_recipe_change(new, ref) is None
    assert compare_metrics(new, ref) == ["final loss 0.3400 vs reference 0.2800"] and comparison_notes(new, ref) == []
    new["config"]["vae"]["seed"] = 2
    assert vae_recipe_change(new, ref) == "seed 2 vs 0"
    assert compare_metrics(new, ref) == []
    assert comparison_notes(new, ref) == ["final loss 0.3400 vs reference 0.2800 not compared: the VAE recipes "
                                          "differ (seed 2 vs 0), so the DiT was trained in another latent space"]


def test_written_defaults_load_through_the_service(tmp_path):
    """Training writes ``microverse_defaults.json`` without importing the serving package; the service reads
    every field of it back."""
    cfg = demo_debug_config()
    write_defaults(cfg, tmp_path)
    assert (tmp_path / DEFAULTS_FILE).is_file()
    assert set(json.loads((tmp_path / DEFAULTS_FILE).read_text())) <= set(ModelDefaults.__dataclass_fields__)
    assert read_defaults(str(tmp_path)) == ModelDefaults(
        height=cfg.size, width=cfg.size, num_frames=cfg.frames, num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale, fps=cfg.fps, max_sequence_length=cfg.model.max_sequence_length,
    )  # fmt: skip


def test_demo_commands_need_the_serving_engine(tmp_path):
    """Without ``microverse.cli``'s context object, the commands that run checkpoints say where to run them."""
    res = CliRunner().invoke(training_main, ["train", "demo-bench", str(tmp_path)])
    assert res.exit_code == 2 and "microverse train demo-bench" in res.output
