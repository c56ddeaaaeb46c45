"""Physics analysers recover simulator ground truth; evaluation and the physics command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from evaluation.physics import (
    ACCEPTANCE_PROMPTS,
    HELDOUT_SEED,
    acceptance_checks,
    check_process,
    evaluate_physics,
    heldout_cases,
    load_vae,
    physics_command,
    simulator_generate,
    simulator_prompt_generate,
    through_vae,
)
from media.video import write_mp4
from microverse.cli import main
from simulator.analysis import analyse, detect_blobs, link_tracks, load_video, msd_diffusion
from simulator.dataset import write_dataset
from simulator.render import render_clip


def _clips_with(process: str, n: int, **where):
    """The first ``n`` clips (seeds 100, 101, ...) whose params match ``where``."""
    out = []
    for seed in range(100, 400):
        clip = render_clip(process, seed)
        if all(clip.params[k] == v for k, v in where.items()):
            out.append(clip)
            if len(out) == n:
                return out
    raise AssertionError(f"fewer than {n} {process} clips with {where}")


def _early_late(counts):
    q = len(counts) // 4
    return np.bincount(counts[:q]).argmax(), np.bincount(counts[-q:]).argmax()


def test_acceptance_mitosis_one_then_two_cells(tmp_path):
    """'a cell divides into two daughter cells': 1 then 2 cells, all 10 seeds, also after H.264."""
    seen = 0
    for clip in _clips_with("mitosis", 10):
        path = tmp_path / f"{clip.seed}.mp4"
        write_mp4(path, clip.frames, 16)
        for video in (clip.frames, path):
            seen += _early_late(analyse(video).counts) == (1, 2)
    assert seen == 20


def test_acceptance_diffusing_versus_flowing_right():
    """'particles diffusing' vs 'red blood cells flowing to the right': drift differs in all 10 seeds."""
    diffusing = _clips_with("diffusion", 10)
    flowing = _clips_with("blood_flow", 10, direction="right")
    ok = 0
    for d, f in zip(diffusing, flowing, strict=True):
        vd, vf = np.asarray(analyse(d.frames).velocity), np.asarray(analyse(f.frames).velocity)
        ok += np.linalg.norm(vd) < 0.75 and vf[0] > 0.8 and abs(vf[1]) < 0.3 and vf[0] - vd[0] > 0.8
    assert ok == 10


def test_acceptance_checks_on_simulator_and_noise():
    ceiling = acceptance_checks(simulator_prompt_generate())
    assert ceiling == {
        "mitosis_one_then_two": {"passed": 10, "n": 10, "required": 7, "ok": True},
        "diffusing_vs_flowing_right": {"passed": 10, "n": 10, "required": 8, "ok": True},
    }
    rng = np.random.default_rng(0)
    noise = acceptance_checks(lambda p, s: rng.integers(0, 255, (17, 64, 64, 3), dtype=np.uint8), range(3))
    assert noise["mitosis_one_then_two"]["passed"] == 0 and not noise["diffusing_vs_flowing_right"]["ok"]
    gen = simulator_prompt_generate()
    swapped = acceptance_checks(lambda p, s: gen(ACCEPTANCE_PROMPTS["diffusing"], s), range(3))
    assert swapped["diffusing_vs_flowing_right"]["passed"] == 0  # no rightward drift where flow was asked


def test_blob_detection_matches_truth_counts_for_both_looks():
    for look in ("fluorescence", "brightfield"):
        clip = _clips_with("mitosis", 1, look=look)[0]
        counts = [len(b.centroids) for b in detect_blobs(clip.frames)[0]]
        agree = np.mean(np.asarray(counts) == clip.truth["counts"])
        assert agree >= 0.8, (look, counts, clip.truth["counts"])


def test_msd_recovers_diffusion_coefficient():
    ratios, truth_ratios = [], []
    for clip in _clips_with("diffusion", 8):
        d = clip.params["diffusion_coefficient"]
        ratios.append(analyse(clip.frames).diffusion_coefficient / d)
        pos = clip.truth["positions"]
        tracks = [np.column_stack([np.arange(len(pos)), pos[:, i]]) for i in range(pos.shape[1])]
        truth_ratios.append(msd_diffusion(tracks, np.zeros(2)) / d)
    assert all(0.5 < r < 2 for r in ratios), ratios
    assert 0.75 < np.median(ratios) < 1.3 and 0.75 < np.median(truth_ratios) < 1.3


@pytest.mark.parametrize("process", ["blood_flow", "vesicle_transport"])
def test_velocity_and_optical_flow_match_truth(process):
    for direction, (ux, uy) in {"left": (-1, 0), "down": (0, 1)}.items():
        clip = _clips_with(process, 1, direction=direction)[0]
        m = analyse(clip.frames)
        truth = clip.params["velocity"] * np.array([ux, uy])
        assert np.allclose(m.velocity, truth, atol=0.2 * clip.params["velocity"]), (m.velocity, truth)
        assert np.allclose(m.flow_velocity, truth, atol=0.35 * clip.params["velocity"]), (m.flow_velocity, truth)


def test_drift_toward_source():
    for clip in _clips_with("chemotaxis", 4):
        m = analyse(clip.frames, source=clip.params["source"])
        truth = clip.params["drift_toward_source"]
        assert 0.5 * truth < m.drift_toward_source < 1.5 * truth
        mirrored = clip.frames.shape[2] - np.asarray(clip.params["source"])  # the opposite side
        away = analyse(clip.frames, source=mirrored)
        assert away.drift_toward_source < 0


def test_apoptosis_area_shrinks():
    for clip in _clips_with("apoptosis", 4):
        passed, metrics = check_process("apoptosis", clip.params, analyse(clip.frames))
        assert passed and metrics["measured"] < 0.8


def test_checks_reject_wrong_physics():
    right = _clips_with("blood_flow", 1, direction="right")[0]
    left_params = {**right.params, "direction": "left"}
    assert check_process("blood_flow", right.params, analyse(right.frames))[0]
    assert not check_process("blood_flow", left_params, analyse(right.frames))[0]
    diff = _clips_with("diffusion", 1)[0]
    assert not check_process("mitosis", {}, analyse(diff.frames))[0]
    assert not check_process("diffusion", {**diff.params, "diffusion_coefficient": 20.0}, analyse(diff.frames))[0]


def test_load_video_inputs(tmp_path):
    clip = render_clip("mitosis", 0)
    assert load_video(clip.frames / 255.0).dtype == np.uint8
    assert load_video(clip.frames[..., 0]).shape == (17, 64, 64, 3)
    write_mp4(tmp_path / "c.mp4", clip.frames, 16)
    assert load_video(tmp_path / "c.mp4").shape == (17, 64, 64, 3)


def test_link_tracks_follows_moving_blobs():
    clip = _clips_with("vesicle_transport", 1, direction="right")[0]
    blobs, _ = detect_blobs(clip.frames)
    tracks = link_tracks(blobs, 64 / 6)
    assert max(len(t) for t in tracks) >= 10
    assert all(np.all(np.diff(t[:, 0]) == 1) for t in tracks)


def test_evaluate_physics_ceiling_and_floor():
    cases = heldout_cases(3)
    assert len(cases) == 18 and len({c.prompt for c in cases}) > 6
    ceiling = evaluate_physics(simulator_generate(cases), cases, "simulator")
    assert ceiling.accuracy() == {**{c.process: 1.0 for c in cases}, "overall": 1.0}
    rng = np.random.default_rng(0)
    floor = evaluate_physics(lambda p, s: rng.integers(0, 255, (17, 64, 64, 3), dtype=np.uint8), cases, "noise")
    assert floor.accuracy()["overall"] <= 0.2

    def broken(prompt, seed):
        raise RuntimeError("generator crashed")

    failed = evaluate_physics(broken, cases[:2], "broken")
    assert failed.accuracy()["overall"] == 0 and "generator crashed" in failed.results[0].error


def test_through_vae_reconstructs_the_generated_clip(tiny_model_dir):
    """The reconstruction ceiling: any generate, encoded and decoded by a pipeline's (or a bare) VAE."""
    cases = heldout_cases(1, processes=["mitosis", "diffusion"])
    sim = simulator_generate(cases)
    via_pipeline = through_vae(sim, tiny_model_dir)
    via_folder = through_vae(sim, tiny_model_dir / "vae")
    via_module = through_vae(sim, load_vae(tiny_model_dir))
    c = cases[0]
    clip = sim(c.prompt, c.seed)
    rec = via_pipeline(c.prompt, c.seed)
    assert rec.shape == clip.shape == (17, 64, 64, 3) and rec.dtype == np.uint8
    assert np.abs(rec.astype(int) - clip).mean() > 1  # the tiny VAE is random: it does change the clip
    np.testing.assert_array_equal(rec, via_folder(c.prompt, c.seed))
    np.testing.assert_array_equal(rec, via_module(c.prompt, c.seed))
    assert evaluate_physics(via_pipeline, cases, "random VAE").accuracy()["overall"] < 1.0


def test_heldout_cases_in_one_look_keep_the_ceiling():
    """A model trained on one look is evaluated on that look; the ceiling re-renders the same clips."""
    cases = heldout_cases(2, looks=["brightfield"])
    assert {c.params["look"] for c in cases} == {"brightfield"}
    assert evaluate_physics(simulator_generate(cases), cases, "simulator").accuracy()["overall"] == 1.0


def test_heldout_cases_are_deterministic_and_not_training_seeds():
    a, b = heldout_cases(2, processes=["mitosis"]), heldout_cases(2, processes=["mitosis"])
    assert a == b and a[0].seed not in range(10_000)
    assert heldout_cases(2, seed=HELDOUT_SEED + 1, processes=["mitosis"]) != a


def _check_outputs(out, labels, acceptance=True):
    md = (out / "physics_report.md").read_text()
    assert "| mitosis |" in md and "| overall |" in md
    assert ("| mitosis_one_then_two |" in md) == acceptance
    for label in labels:
        assert label in md
    report = json.loads((out / "physics_report.json").read_text())
    for name in ("accuracy.png", "measurements.png"):
        assert Image.open(out / name).size[0] > 100
    return {s["label"]: s["accuracy"] for s in report["sources"]}


def test_physics_command_simulator_and_videos(tmp_path):
    runner = CliRunner()
    args = ["--source", "simulator", "--n-per-process", "2", "--acceptance-seeds", "2", "--out", str(tmp_path / "sim")]
    res = runner.invoke(physics_command, args)
    assert res.exit_code == 0, res.output
    acc = _check_outputs(tmp_path / "sim", ["simulator"])
    assert acc["simulator"]["overall"] == 1.0 and len(acc["simulator"]) == 7

    write_dataset(tmp_path / "clips", 6, seed=3)
    res = runner.invoke(physics_command, ["--videos", str(tmp_path / "clips"), "--out", str(tmp_path / "vid")])
    assert res.exit_code == 0, res.output
    assert _check_outputs(tmp_path / "vid", ["videos:clips"], acceptance=False)["videos:clips"]["overall"] == 1.0


def test_physics_command_model_needs_the_serving_engine(tmp_path):
    """Evaluation never imports the serving package: ``--model`` works only through ``microverse eval physics``."""
    res = CliRunner().invoke(physics_command, ["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "microverse eval physics" in res.output


@pytest.mark.slow
def test_physics_command_untrained_model_floor(tmp_path, tiny_model_dir):
    model = tiny_model_dir  # seeded random weights: the untrained floor
    args = ["--source", "simulator", "--model", str(model), "--vae", str(model / "vae"), "--processes", "mitosis"]
    args += ["--acceptance-seeds", "1", "--n-per-process", "1", "--steps", "1", "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, ["eval", "physics", *args])
    assert res.exit_code == 0, res.output
    acc = _check_outputs(tmp_path / "out", ["simulator", "vae:vae", f"model:{model.name}"])
    assert acc["simulator"]["overall"] == 1.0
    assert set(acc[f"model:{model.name}"]) == set(acc["vae:vae"]) == {"mitosis", "overall"}
