"""Judge protocols: ``upstream`` sends the published evaluator's exact request; ``ours`` is unchanged."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from evaluation.cli import eval_group
from evaluation.judge import (
    OURS,
    PROTOCOLS,
    UPSTREAM,
    JudgeConfig,
    JudgeError,
    VLMJudge,
    build_prompt,
    frame_positions,
    parse_upstream_answer,
    upstream_prompt,
)
from media.video import write_mp4

_DIMS = {"rubrics_scientific": "scientific", "rubrics_visual": "visual", "rubrics_instruction": "instruction"}
_TITLES = {
    "rubrics_scientific": "Scientific Accuracy",
    "rubrics_visual": "Visual Quality",
    "rubrics_instruction": "Instruction Following",
}


def _published_prompt(entry: dict, block_key: str) -> str:
    """The published evaluator's prompt, rebuilt here from a raw ``MWBenchRubrics.json`` entry as it does."""
    block = entry[block_key]
    listed = ""
    for k in range(1, 10):
        if f"d{k}" in block and f"s{k}" in block:
            kind = "Positive Point" if block[f"s{k}"] == "+1" else "Penalty Point"
            listed += f"{k}. [{kind}] {block[f'd{k}']}\n"
    title = _TITLES[block_key]
    return "\n".join(
        [
            "You are a professional video evaluation expert. Please evaluate this microscopic world scientific "
            f"animation video in the {title} dimension according to the following criteria.",
            "",
            "**Task Description:**",
            entry.get("任务", ""),
            "",
            "**Detailed Requirements:**",
            entry.get("具体要求", ""),
            "",
            f"**{title} Evaluation Criteria:**",
            listed,
            "",
            "**Evaluation Instructions:**",
            "1. Carefully observe the 8 video screenshots arranged in chronological order.",
            "2. Judge each evaluation point: mark 1 if the criterion is met, 0 otherwise.",
            "3. Positive Points: score 1 if the video meets the standard.",
            "4. Penalty Points: score 1 if the video exhibits the described problem.",
            "5. Provide detailed reasoning for every judgment.",
            "",
            "**Output Format (strict JSON):**",
            "{",
            '    "scores": [score1, score2, ...],',
            '    "reasoning": "Detailed reasoning explaining the judgment for each criterion."',
            "}",
            "",
            'The length of "scores" must equal the number of evaluation points; each element is 0 or 1.',
        ]
    )


def _published_frames(path: Path, count: int = 8) -> list[np.ndarray]:
    """RGB frames at the published evaluator's positions ``int(i * step + step / 2)``, read with OpenCV."""
    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    step = total / count
    frames = []
    for position in (int(i * step + step / 2) for i in range(count)):
        capture.set(cv2.CAP_PROP_POS_FRAMES, position)
        ok, frame = capture.read()
        assert ok
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def _jpeg(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    assert image.format == "JPEG"
    return image


def _quality(image: Image.Image) -> int:
    """The IJG quality whose quantization tables ``image`` has."""
    probe = Image.new("RGB", (16, 16))
    for quality in range(100, 0, -1):
        buffer = io.BytesIO()
        probe.save(buffer, format="JPEG", quality=quality)
        if Image.open(buffer).quantization == image.quantization:
            return quality
    raise AssertionError("not an IJG quality table")


def _images(body: dict) -> list[Image.Image]:
    return [_jpeg(part["image_url"]["url"]) for part in body["messages"][0]["content"][1:]]


def _wide_video(path: Path) -> Path:
    """16 frames, 1280 x 96 (wider than ``ours`` sends), frame i a flat grey of level 10 * i."""
    frames = np.empty((16, 96, 1280, 3), dtype=np.uint8)
    frames[:] = (10 * np.arange(16)).astype(np.uint8)[:, None, None, None]
    return write_mp4(path, frames, fps=8, crf=10)


def _run(fake_judge, videos: Path, out: Path, bench_dir: Path, *extra: str):
    args = ["run", "--videos", str(videos), "--model-name", "tiny", "--out", str(out), "--benchmark", str(bench_dir)]
    args += ["--judge-base-url", fake_judge.base_url, "--judge-model", "fake-judge", *extra]
    return CliRunner().invoke(eval_group, args)


def test_upstream_protocol_sends_the_published_request(fake_judge, tmp_path, bench_dir):
    videos = tmp_path / "videos"
    for index in (1, 2):
        _wide_video(videos / f"{index}.mp4")
    out = tmp_path / "run"
    result = _run(
        fake_judge, videos, out, bench_dir, "--index", "1,2", "--judge-protocol", "upstream", "--scoring", "published"
    )
    assert result.exit_code == 0, result.output
    bodies = list(fake_judge.state.bodies)
    assert len(bodies) == 6 and fake_judge.state.total_answered == 6

    entries = {e["index"]: e for e in json.loads((bench_dir / "MWBenchRubrics.json").read_text(encoding="utf-8"))}
    expected = {
        _published_prompt(entries[index], key): (index, key) for index in (1, 2) for key in _DIMS
    }  # the text of each (task, dimension) is distinct
    assert len(expected) == 6
    frames = _published_frames(videos / "1.mp4")
    seen = set()
    for body in bodies:
        assert set(body) == {"model", "messages"}  # no temperature, seed or response_format
        prompt = body["messages"][0]["content"][0]["text"]
        assert prompt in expected, prompt
        seen.add(expected[prompt])
        placeholder = {"type": "image_url", "image_url": {"url": "..."}}
        shape = {
            "model": "fake-judge",
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}] + [placeholder] * 8}],
        }
        sent = json.loads(json.dumps(body))
        for part in sent["messages"][0]["content"][1:]:
            part["image_url"]["url"] = "..."
        assert sent == shape
        for image, frame in zip(_images(body), frames, strict=True):
            assert image.size == (1280, 96)  # native resolution
            assert all(v == 1 for table in image.quantization.values() for v in table)  # JPEG quality 100
            assert np.abs(np.asarray(image.convert("RGB"), dtype=float) - frame).mean() < 3
    assert seen == set(expected.values())

    report = json.loads((out / "report.json").read_text())
    assert (report["judge_protocol"], report["scoring"], report["coverage"]["valid"]) == ("upstream", "published", 2)
    exported = json.loads((out / "tiny_result.json").read_text())
    assert [len(item["instruction_eval"]["parsed_result"]["scores"]) for item in exported] == [5, 5]


def test_renumbered_block_lists_no_criteria_upstream(bench):
    task = bench.tasks[2]  # instruction block numbered d11..d55
    criteria = task.rubrics["instruction"]
    prompt = upstream_prompt(task.task, task.requirement, "instruction", criteria)
    assert "**Task Description:**\n\n\n**Detailed Requirements:**\n\n\n" in prompt  # upstream read no task text
    assert "**Instruction Following Evaluation Criteria:**\n\n\n**Evaluation Instructions:**" in prompt
    assert "Point]" not in prompt and all(c.text not in prompt for c in criteria)
    ours = build_prompt(task.task, task.requirement, "instruction", criteria)
    assert task.task in ours and all(f"{k}. [" in ours for k in range(1, 6))
    visual = upstream_prompt(task.task, task.requirement, "visual", task.rubrics["visual"])
    for k, c in enumerate(task.rubrics["visual"], 1):
        assert f"{k}. [{'Positive' if c.sign > 0 else 'Penalty'} Point] {c.text}\n" in visual
    four = bench.tasks[277].rubrics["instruction"]
    assert upstream_prompt("", "", "instruction", four).count("Point] ") == 4


def test_upstream_frame_positions_equal_ours():
    for total in range(1, 5001):
        step = total / 8
        assert frame_positions(total, 8) == [int(i * step + step / 2) for i in range(8)], total


@pytest.fixture()
def noise_frames() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(8)]


def test_upstream_413_lowers_jpeg_quality(fake_judge, judge_config, noise_frames, bench):
    task = bench.tasks[1]
    judge = VLMJudge(judge_config.model_copy(update={"protocol": "upstream", "max_retries": 0}))

    def judge_visual():
        return judge.judge(noise_frames, task.task, task.requirement, "visual", task.rubrics["visual"])

    judge_visual()
    full = len(json.dumps(fake_judge.state.bodies[-1]))
    fake_judge.state.max_body_bytes = full // 2  # quality 100 refused, quality 30 accepted
    fake_judge.state.bodies.clear()
    assert len(judge_visual().scores) == 5
    assert [_quality(_images(b)[0]) for b in fake_judge.state.bodies] == [100, 30]
    assert fake_judge.state.status_counts[413] == 1
    assert all(image.size == (128, 128) for image in _images(fake_judge.state.bodies[-1]))

    fake_judge.state.max_body_bytes = 1000
    fake_judge.state.bodies.clear()
    with pytest.raises(JudgeError, match="413"):
        judge_visual()
    assert [_quality(_images(b)[0]) for b in fake_judge.state.bodies] == [100, 30, 20, 10]


def test_upstream_answers_are_taken_as_given_never_reasked(fake_judge, judge_config, noise_frames, bench):
    task = bench.tasks[1]
    judge = VLMJudge(judge_config.model_copy(update={"protocol": "upstream"}))
    fake_judge.state.faults.extend(["short", "garbage"])
    short = judge.judge(noise_frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert len(short.scores) == 4 and short.requests == 1 and short.parsed["scores"] == short.scores
    with pytest.raises(JudgeError, match="after 1 request"):
        judge.judge(noise_frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert fake_judge.state.total_answered == 2
    assert parse_upstream_answer('Here: {"scores": [1, "1", 2, true, 0], "reasoning": "r"} done') == (
        [1, 0, 0, 1, 0],
        {"scores": [1, "1", 2, True, 0], "reasoning": "r"},
    )
    for text in ("no json", '{"scores": []}', '{"reasoning": "r"}', "{not json}"):
        with pytest.raises(ValueError):
            parse_upstream_answer(text)


def test_ours_request_is_unchanged(fake_judge, judge_config, noise_frames, bench):
    task = bench.tasks[1]
    j = VLMJudge(judge_config).judge(noise_frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    body = fake_judge.state.bodies[-1]
    assert body["temperature"] == 0 and body["seed"] == 0
    assert body["response_format"]["json_schema"]["schema"]["properties"]["scores"]["minItems"] == 5
    prompt = body["messages"][0]["content"][0]["text"]
    assert prompt == build_prompt(task.task, task.requirement, "visual", task.rubrics["visual"], 8)
    assert {_quality(image) for image in _images(body)} == {90}
    assert len(j.scores) == len(j.reasons) == 5 and j.parsed is None
    assert (OURS.version, OURS.temperature, OURS.seed, OURS.max_image_side) == ("mwb-judge-v1", 0.0, 0, 1024)


def test_cache_keys_differ_between_protocols(fake_judge, videos_dir, tmp_path, bench_dir):
    out = tmp_path / "run"
    args = ("--index", "1,3")
    assert _run(fake_judge, videos_dir, out, bench_dir, *args).exit_code == 0
    assert fake_judge.state.total_answered == 6
    assert _run(fake_judge, videos_dir, out, bench_dir, *args, "--judge-protocol", "upstream").exit_code == 0
    assert fake_judge.state.total_answered == 12  # nothing reused from the other protocol
    assert _run(fake_judge, videos_dir, out, bench_dir, *args, "--judge-protocol", "upstream").exit_code == 0
    assert _run(fake_judge, videos_dir, out, bench_dir, *args).exit_code == 0
    assert fake_judge.state.total_answered == 12  # each protocol's answers come from its own cache entries
    with sqlite3.connect(out / "cache.sqlite") as db:
        versions = dict(db.execute("SELECT prompt_version, COUNT(*) FROM judgements GROUP BY prompt_version"))
    assert versions == {"mwb-judge-v1": 6, "mwb-upstream-v1": 6}
    assert len({p.version for p in PROTOCOLS.values()}) == len(PROTOCOLS)


def test_protocol_is_configured_by_env_option_and_validated(monkeypatch, fake_judge, videos_dir, tmp_path, bench_dir):
    monkeypatch.setenv("MICROVERSE_JUDGE_PROTOCOL", "upstream")
    assert JudgeConfig(base_url="http://127.0.0.1:9/v1").protocol == "upstream"
    monkeypatch.delenv("MICROVERSE_JUDGE_PROTOCOL")
    assert JudgeConfig().protocol == "ours" and PROTOCOLS["upstream"] is UPSTREAM
    with pytest.raises(ValidationError, match="unknown judge protocol"):
        JudgeConfig(protocol="paper")
    bad = _run(fake_judge, videos_dir, tmp_path / "bad", bench_dir, "--judge-protocol", "paper")
    assert bad.exit_code == 2 and "paper" in bad.output
    args = ["agreement", "--videos", str(videos_dir), "--model-name", "tiny", "--out", str(tmp_path / "agree")]
    args += ["--benchmark", str(bench_dir), "--tasks", "1", "--repeats", "2", "--judge-protocol", "upstream"]
    args += ["--judge-base-url", fake_judge.base_url, "--judge-model", "fake-judge"]
    agreement = CliRunner().invoke(eval_group, args)
    assert agreement.exit_code == 0, agreement.output
    assert fake_judge.state.bodies and all(set(b) == {"model", "messages"} for b in fake_judge.state.bodies)
