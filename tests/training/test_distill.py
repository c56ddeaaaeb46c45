"""Few-step distillation (``training.distill``): the stages, resume, the student as a served adapter, the benchmark."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from microverse.loading import read_lora
from microverse.sources import engine_generate, model_runner
from training.cli import main as training_main
from training.distill import (
    DEFAULTS_METADATA_KEY,
    LORA_FILE,
    METRICS_FILE,
    TimestepSampler,
    debug_distill_config,
    declared_defaults,
    distill,
    load_pairs,
    student_config,
    student_sigmas,
    write_card,
)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, tiny_model, tiny_dataset):
    out = tmp_path_factory.mktemp("distill")
    cfg = replace(debug_distill_config(), teacher=str(tiny_model), prompts=str(tiny_dataset))
    return cfg, out, distill(cfg, out)


def test_euler_on_the_straight_path_lands_on_the_teacher_sample():
    """The student's target z - x0, stepped by diffusers' Euler sampler over the declared grid, reaches x0 exactly:
    the grid, sign and timestep conventions of training and serving agree."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, z = torch.randn(2, 8, 3, 4, 4), torch.randn(2, 8, 3, 4, 4)
    for steps, shift in ((4, 1.0), (2, 1.0), (4, 3.0)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps)
        assert torch.allclose(scheduler.timesteps / 1000, student_sigmas(steps, shift))
        x = z.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(z - x0, t, x).prev_sample
        assert torch.allclose(x, x0, atol=1e-5)


def test_timesteps_come_from_the_student_grids_in_the_configured_fraction():
    cfg = replace(debug_distill_config(), student_steps=(4, 2), flow_shift=1.0, grid_fraction=0.75)
    sigmas = TimestepSampler(cfg)(4000, torch.Generator().manual_seed(0))
    grid = torch.cat([student_sigmas(4, 1.0), student_sigmas(2, 1.0)])
    on_grid = (sigmas[:, None] - grid[None]).abs().min(1).values < 1e-6
    assert 0.72 < on_grid.float().mean() < 0.78
    assert ((sigmas > 0) & (sigmas <= 1)).all()


def test_distill_writes_pairs_a_student_declaring_its_sampling_and_resumes(student_run):
    cfg, out, student = student_run
    pairs = load_pairs(out / "pairs")
    assert pairs["latents"].shape == pairs["noise"].shape and len(pairs["latents"]) == cfg.pairs
    assert not torch.equal(pairs["latents"], pairs["noise"])
    with safe_open(str(student / LORA_FILE), framework="pt") as f:
        declared = json.loads(f.metadata()[DEFAULTS_METADATA_KEY])
    assert declared == {"num_inference_steps": cfg.declared_steps, "guidance_scale": 1.0, "cfg_distilled": True,
                        "scheduler": "euler", "flow_shift": cfg.flow_shift}  # fmt: skip
    metrics = json.loads((student / METRICS_FILE).read_text())
    assert metrics["training"]["steps"] == cfg.steps and set(metrics["timings"]) == {"pairs", "train"}
    assert student_config(student) == cfg
    # The service reads the student as an adapter with its declared sampling.
    lora = read_lora(str(student))
    assert lora.defaults == declared and any("lora_A" in k for k in lora.state_dict)
    # A second run finds every stage done: same pairs, no retraining, the same student.
    before = load_file(str(student / LORA_FILE))
    distill(cfg, out)
    after = load_file(str(student / LORA_FILE))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((student / METRICS_FILE).read_text())["training"] == metrics["training"]


def test_the_student_runs_through_the_engine_with_its_declared_euler_sampler(student_run, tiny_model):
    _, _, student = student_run
    gen = engine_generate(tiny_model, 64, 17, 4, 1.0, lora=student)
    assert gen("a cell divides", 0).shape == (17, 64, 64, 3)
    plain = engine_generate(tiny_model, 64, 17, 4, 1.0)
    assert not (gen("a cell divides", 0) == plain("a cell divides", 0)).all()


def test_benchmark_measures_every_row_in_one_run_and_writes_the_card(student_run):
    cfg, _, student = student_run
    table = write_card(cfg, student, model_runner())
    bench = json.loads((student / METRICS_FILE).read_text())["benchmark"]
    labels = [r["label"] for r in bench["rows"]]
    assert labels == ["teacher", "fast preset", "student, 4 steps", "student, 2 steps"]
    assert bench["cases"] == 6 and all(r["seconds_per_clip"] > 0 for r in bench["rows"])
    assert bench["rows"][0]["time_vs_teacher"] == 1.0 and bench["rows"][0]["points_vs_teacher"] == 0.0
    assert set(bench["acceptance"]) == {"student_steps", "points_vs_teacher", "time_vs_teacher", "ok"}
    card = (student / "README.md").read_text()
    assert card.startswith(f"# {cfg.name}") and table in card and "InstaFlow" in card


def test_declared_steps_must_be_trained_steps():
    with pytest.raises(ValueError, match="declared_steps=3"):
        declared_defaults(replace(debug_distill_config(), declared_steps=3))


def test_distill_commands_need_the_serving_engine_to_benchmark(tmp_path):
    res = CliRunner().invoke(training_main, ["train", "distill-bench", str(tmp_path)])
    assert res.exit_code == 2 and "microverse train distill-bench" in res.output
    res = CliRunner().invoke(training_main, ["train", "distill", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "microverse train distill" in res.output
