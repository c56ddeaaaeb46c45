"""Simulator: determinism, looks, ground truth, captions, dataset format, commands."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from media.video import read_video
from simulator.dataset import write_dataset
from simulator.render import (
    CAPTION_VOCAB,
    DIRECTION_WORDS,
    DIRECTIONS,
    LEVELS,
    LOOKS,
    PROCESSES,
    SIDE_WORDS,
    clip_seeds,
    parse_prompt,
    render_clip,
    simulate_prompt,
)
from training.cli import simulate_command, simulate_speed_command

NAMES = ["diffusion", "mitosis", "blood_flow", "chemotaxis", "vesicle_transport", "apoptosis"]


def _clip_with(process: str, **where):
    """First clip (seeds 0, 1, ...) whose params match ``where``."""
    for seed in range(200):
        clip = render_clip(process, seed)
        if all(clip.params[k] == v for k, v in where.items()):
            return clip
    raise AssertionError(f"no {process} clip with {where}")


def test_registry():
    assert list(PROCESSES) == NAMES
    assert set(LEVELS) == set(NAMES)
    assert set(LEVELS.values()) <= {"Cellular-level", "Subcellular-level", "Organ-level"}


@pytest.mark.parametrize("process", NAMES)
def test_deterministic_by_seed(process):
    a, b, c = render_clip(process, 3), render_clip(process, 3), render_clip(process, 4)
    assert np.array_equal(a.frames, b.frames)
    assert (a.prompt, a.params) == (b.prompt, b.params)
    for key in a.truth:
        assert np.array_equal(a.truth[key], b.truth[key])
    assert not np.array_equal(a.frames, c.frames)


def test_clip_seeds_are_stable_prefixes():
    assert clip_seeds(0, 5) == clip_seeds(0, 50)[:5]
    assert clip_seeds(0, 5) != clip_seeds(1, 5)


@pytest.mark.parametrize("process", NAMES)
def test_looks_and_truth_shapes(process):
    fluo, bright = _clip_with(process, look="fluorescence"), _clip_with(process, look="brightfield")
    for clip in (fluo, bright):
        assert clip.frames.shape == (17, 64, 64, 3) and clip.frames.dtype == np.uint8
        assert clip.truth["counts"].shape == (17,)
        assert clip.truth["positions"].shape[0] == 17 and clip.truth["positions"].shape[2] == 2
    gray_f, gray_b = fluo.frames.max(-1), bright.frames.min(-1)
    assert np.median(gray_f) < 40 and gray_f.max() > 120  # dark background, glowing objects
    assert np.median(gray_b) > 150 and gray_b.min() < 110  # light background, dark objects
    noise = fluo.frames.astype(float)[1:, :4, :4].std()  # shot/read noise, not a flat background
    assert noise > 0


def test_mitosis_truth_goes_one_to_two():
    for seed in range(5):
        counts = render_clip("mitosis", seed).truth["counts"]
        assert counts[0] == 1 and counts[-1] == 2
        assert np.all(np.diff(counts) >= 0)


def test_apoptosis_truth_shrinks_and_blebs():
    clip = render_clip("apoptosis", 0)
    radii = clip.truth["radii"]
    assert radii[-1] / radii[0] == pytest.approx(clip.params["shrink_factor"], rel=0.05)
    assert clip.truth["blebs"][0] == 0 and clip.truth["blebs"][-1] >= 3


@pytest.mark.parametrize("process", ["blood_flow", "vesicle_transport"])
def test_stream_truth_moves_in_caption_direction(process):
    for direction in DIRECTIONS:
        clip = _clip_with(process, direction=direction)
        steps = np.diff(clip.truth["positions"], axis=0).reshape(-1, 2)
        steps = steps[np.linalg.norm(steps, axis=1) < 10]  # drop wrap-around jumps
        along = steps @ np.asarray(DIRECTIONS[direction])
        assert np.median(along) == pytest.approx(clip.params["velocity"], rel=0.15)
        assert DIRECTION_WORDS[direction] in clip.prompt


def test_diffusion_truth_matches_coefficient():
    ratios = []
    for seed in range(20):
        clip = render_clip("diffusion", seed)
        steps = np.diff(clip.truth["positions"], axis=0)
        ratios.append(np.mean(np.sum(steps**2, axis=-1)) / 4 / clip.params["diffusion_coefficient"])
    assert 0.8 < np.median(ratios) < 1.1  # reflecting walls only ever shorten steps


def test_chemotaxis_truth_drifts_to_source():
    for side in DIRECTIONS:
        clip = _clip_with("chemotaxis", source_side=side)
        assert clip.params["drift_toward_source"] > 0.3
        assert SIDE_WORDS[side] in clip.prompt
        pos = clip.truth["positions"]
        d = np.linalg.norm(pos - np.asarray(clip.params["source"]), axis=-1).mean(axis=1)
        assert d[-1] < d[0]


KEY_WORDS = {
    "diffusion": "diffus",
    "mitosis": "two daughter cells",
    "blood_flow": "blood",
    "chemotaxis": "toward",
    "vesicle_transport": "vesicle",
    "apoptosis": "shrink",
}


@pytest.mark.parametrize("process", NAMES)
def test_captions_varied_in_vocab_and_informative(process):
    prompts = {render_clip(process, seed, size=16, frames=5).prompt for seed in range(40)}
    assert len(prompts) >= 4
    for prompt in prompts:
        assert KEY_WORDS[process] in prompt
        assert ("fluorescence microscopy" in prompt) != ("brightfield microscopy" in prompt)
        words = re.sub(r"[^\w\s-]", " ", prompt.lower()).split()
        assert set(words) <= set(CAPTION_VOCAB), set(words) - set(CAPTION_VOCAB)


def test_other_sizes():
    clip = render_clip("blood_flow", 1, size=32, frames=9)
    assert clip.frames.shape == (9, 32, 32, 3)


def test_unknown_process():
    with pytest.raises(KeyError):
        render_clip("osmosis", 0)


def test_looks_restrict_the_drawn_look_and_leave_the_default_unchanged():
    for seed in range(8):
        default, both = render_clip("mitosis", seed), render_clip("mitosis", seed, looks=LOOKS)
        assert np.array_equal(default.frames, both.frames) and default.prompt == both.prompt
        assert render_clip("mitosis", seed, looks=["brightfield"]).params["look"] == "brightfield"
    assert {render_clip("diffusion", s).params["look"] for s in range(8)} == set(LOOKS)
    for bad in (["phase contrast"], []):
        with pytest.raises(KeyError, match="looks"):
            render_clip("mitosis", 0, looks=bad)


def _read_dataset(root):
    entries = json.loads((root / "metadata.json").read_text())
    truths = [json.loads(line) for line in (root / "ground_truth.jsonl").read_text().splitlines()]
    return entries, truths


def test_write_dataset_format_and_determinism(tmp_path):
    write_dataset(tmp_path / "a", 7, seed=5)
    write_dataset(tmp_path / "b", 7, seed=5, workers=2)
    entries, truths = _read_dataset(tmp_path / "a")
    assert isinstance(entries, list) and len(entries) == 7
    assert [e["process"] for e in entries] == NAMES + NAMES[:1]
    for e, t in zip(entries, truths, strict=True):
        assert {"id", "video", "prompt", "process", "params", "level", "seed"} <= set(e)
        assert isinstance(e["id"], str) and isinstance(e["prompt"], str) and e["prompt"]
        assert e["level"] == LEVELS[e["process"]] and t["id"] == e["id"]
        frames, _ = read_video(tmp_path / "a" / e["video"])
        assert frames.shape == (17, 64, 64, 3)
        clip = render_clip(e["process"], e["seed"])
        assert clip.prompt == e["prompt"]
        assert np.abs(frames.astype(float) - clip.frames).mean() < 6  # H.264 of the same frames
        assert np.allclose(t["positions"], clip.truth["positions"], atol=0.01)
    assert _read_dataset(tmp_path / "b") == (entries, truths)


def test_simulate_command(tmp_path):
    runner = CliRunner()
    res = runner.invoke(simulate_command, ["--out", str(tmp_path), "-n", "3", "--processes", "mitosis,apoptosis"])
    assert res.exit_code == 0, res.output
    entries, _ = _read_dataset(tmp_path)
    assert [e["process"] for e in entries] == ["mitosis", "apoptosis", "mitosis"]
    bad = runner.invoke(simulate_command, ["--out", str(tmp_path / "x"), "--processes", "osmosis"])
    assert bad.exit_code != 0 and "osmosis" in bad.output
    res = runner.invoke(simulate_command, ["--out", str(tmp_path / "f"), "-n", "4", "--looks", "fluorescence"])
    assert res.exit_code == 0, res.output
    assert {e["params"]["look"] for e in _read_dataset(tmp_path / "f")[0]} == {"fluorescence"}
    bad = runner.invoke(simulate_command, ["--out", str(tmp_path / "y"), "--looks", "fluorescence,darkfield"])
    assert bad.exit_code == 2 and "--looks" in bad.output and "darkfield" in bad.output


def test_dataset_files_are_byte_identical_whatever_the_worker_count(tmp_path):
    """48 px is an odd number of macroblocks, where an in-process x264 read stale memory (see media.video)."""
    write_dataset(tmp_path / "a", 36, size=48, frames=17, fps=8, seed=3, workers=1)
    write_dataset(tmp_path / "b", 36, size=48, frames=17, fps=8, seed=3, workers=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 38 and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                                                if p.is_file())
    differing = [str(f) for f in files if (tmp_path / "a" / f).read_bytes() != (tmp_path / "b" / f).read_bytes()]
    assert not differing


def test_simulate_speed_command_reports_rates():
    res = CliRunner().invoke(simulate_speed_command, ["-n", "6"])
    assert res.exit_code == 0, res.output
    wall = [float(x) for x in re.findall(r"([\d.]+) clips/s wall", res.output)]
    cpu = [float(x) for x in re.findall(r"([\d.]+) clips per CPU-second", res.output)]
    assert len(wall) == len(cpu) == 2 and all(r > 0 for r in wall + cpu)
    assert "render only:" in res.output and "render + encode:" in res.output


@pytest.mark.parametrize(
    ("prompt", "process", "where"),
    [
        ("a cell divides into two daughter cells", "mitosis", {}),
        ("particles diffusing", "diffusion", {}),
        ("red blood cells flowing to the right", "blood_flow", {"direction": "right"}),
        ("bacteria swimming toward a source at the top, brightfield microscopy", "chemotaxis", {"source_side": "up"}),
        ("fast vesicles moving down along a microtubule", "vesicle_transport", {"speed": "fast", "direction": "down"}),
        ("an apoptotic cell shrinking, fluorescence microscopy", "apoptosis", {"look": "fluorescence"}),
    ],
)
def test_simulate_prompt_matches_what_the_prompt_pins(prompt, process, where):
    parsed, found = parse_prompt(prompt)
    assert parsed == process and where.items() <= found.items()
    clip = simulate_prompt(prompt, 4)
    assert clip.process == process and where.items() <= clip.params.items()
    assert np.array_equal(clip.frames, simulate_prompt(prompt, 4).frames)


def test_simulate_prompt_rejects_unknown():
    with pytest.raises(ValueError):
        parse_prompt("a cat playing piano")
