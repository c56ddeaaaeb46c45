"""The judge: frame sampling, prompt, parsing, and behaviour against a real loopback server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from evaluation.fake_judge import fake_answer
from evaluation.judge import (
    JudgeConfig,
    JudgeError,
    VideoError,
    VLMJudge,
    build_prompt,
    frame_positions,
    parse_answer,
    sample_frames,
)


def test_frame_positions_as_published():
    assert frame_positions(81) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_positions(16) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert frame_positions(3) == [0, 0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(VideoError):
        frame_positions(0)


def test_sample_frames_picks_published_positions(tmp_path, make_video):
    path = make_video(tmp_path / "v.mp4", n_frames=16)
    frames = sample_frames(path)
    assert len(frames) == 8 and frames[0].size == (32, 32)
    levels = [float(np.asarray(f)[..., 0].mean()) for f in frames]
    assert levels == pytest.approx([10 * p for p in frame_positions(16)], abs=4)
    assert [f.size for f in sample_frames(path.read_bytes())] == [(32, 32)] * 8
    with pytest.raises(VideoError):
        sample_frames(b"definitely not an mp4")


def test_prompt_holds_task_requirement_and_every_criterion(bench):
    task = bench.tasks[2]  # its instruction block is numbered d11..d55 upstream
    prompt = build_prompt(task.task, task.requirement, "instruction", task.rubrics["instruction"])
    assert task.task in prompt and task.requirement in prompt
    for k, criterion in enumerate(task.rubrics["instruction"], 1):
        assert f"{k}. [{'Positive' if criterion.sign > 0 else 'Penalty'} Point] {criterion.text}" in prompt
    assert "Instruction Following Evaluation Criteria (5)" in prompt and "exactly 5 elements" in prompt


def test_parse_answer_is_tolerant_but_strict_on_length():
    assert parse_answer('```json\n{"scores": [1, "0", true], "reasoning": "ok"}\n```', 3) == (
        [1, 0, 1],
        ["", "", ""],
        "ok",
    )
    text = 'Sure! {"scores": [0, 1], "reasons": ["a", "b"], "reasoning": "r"} Hope this helps.'
    assert parse_answer(text, 2) == ([0, 1], ["a", "b"], "r")
    with pytest.raises(ValueError, match="2 scores for 3"):
        parse_answer('{"scores": [0, 1]}', 3)
    with pytest.raises(ValueError, match="no JSON"):
        parse_answer("I think the video is good.", 3)
    with pytest.raises(ValueError, match="not 0 or 1"):
        parse_answer('{"scores": [0, 5]}', 2)


@pytest.fixture()
def frames(tmp_path, make_video):
    return sample_frames(make_video(tmp_path / "v.mp4"))


def test_judge_answers_and_accounts_tokens(fake_judge, judge_config, frames, bench):
    task = bench.tasks[1]
    judge = VLMJudge(judge_config)
    j = judge.judge(frames, task.task, task.requirement, "scientific", task.rubrics["scientific"])
    prompt = build_prompt(task.task, task.requirement, "scientific", task.rubrics["scientific"])
    assert j.scores == fake_answer(prompt, 0)["scores"] and len(j.reasons) == 5 and all(j.reasons)
    assert j.requests == 1 and fake_judge.state.total_answered == 1
    assert j.prompt_tokens == len(prompt) // 4 + 85 * 8 and j.completion_tokens > 0
    assert j.cost_usd == pytest.approx((j.prompt_tokens * 2.5 + j.completion_tokens * 10.0) / 1e6)
    assert judge.usage.requests == 1 and judge.usage.cost_usd == pytest.approx(j.cost_usd)


def test_judge_retries_429_and_5xx_with_backoff(fake_judge, judge_config, frames, bench):
    task = bench.tasks[1]
    fake_judge.state.faults.extend(["429", "500", "429"])
    j = VLMJudge(judge_config).judge(frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert len(j.scores) == 5
    assert fake_judge.state.status_counts == {429: 2, 500: 1, 200: 1}


def test_judge_reasks_short_and_unparsable_answers(fake_judge, judge_config, frames, bench):
    task = bench.tasks[1]
    fake_judge.state.faults.extend(["short", "garbage"])
    judge = VLMJudge(judge_config)
    j = judge.judge(frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert len(j.scores) == 5 and j.requests == 3 and judge.usage.requests == 3
    fake_judge.state.faults.extend(["short", "garbage", "short"])
    with pytest.raises(JudgeError, match="after 3 request"):
        judge.judge(frames, task.task, task.requirement, "visual", task.rubrics["visual"])


def test_judge_shrinks_frames_on_413(fake_judge, judge_config, tmp_path, make_video, bench):
    task = bench.tasks[1]
    big = sample_frames(make_video(tmp_path / "big.mp4", n_frames=8, size=256))
    full = VLMJudge(judge_config.model_copy(update={"max_retries": 0}))
    fake_judge.state.max_body_bytes = 10**9
    full.judge(big, task.task, task.requirement, "visual", task.rubrics["visual"])
    fake_judge.state.max_body_bytes = 15000  # too small for 256 px frames, enough for 128 px ones
    j = full.judge(big, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert len(j.scores) == 5 and fake_judge.state.status_counts[413] == 1  # 256 px refused, 128 px accepted
    fake_judge.state.max_body_bytes = 100
    with pytest.raises(JudgeError, match="413"):
        full.judge(big, task.task, task.requirement, "visual", task.rubrics["visual"])


def test_judge_drops_options_the_server_rejects(fake_judge, judge_config, frames, bench):
    task = bench.tasks[1]
    fake_judge.state.reject_params.update({"response_format", "seed"})
    judge = VLMJudge(judge_config)
    j = judge.judge(frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert len(j.scores) == 5
    assert fake_judge.state.status_counts[400] == 2
    judge.judge(frames, task.task, task.requirement, "scientific", task.rubrics["scientific"])
    assert fake_judge.state.status_counts[400] == 2  # remembered, not rejected again


def test_judge_concurrency_and_rpm_limits(fake_judge, judge_config, frames, bench):
    task = bench.tasks[1]
    fake_judge.state.delay_s = 0.2
    judge = VLMJudge(judge_config.model_copy(update={"concurrency": 2}))
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda d: judge.judge(frames, task.task, task.requirement, d, task.rubrics[d]),
                ["scientific", "visual", "instruction", "visual"],
            )
        )
    assert time.monotonic() - started >= 0.4  # 4 calls of 0.2 s, at most 2 at a time
    fake_judge.state.delay_s = 0.0
    limited = VLMJudge(judge_config.model_copy(update={"rpm": 600}))  # one start per 0.1 s
    started = time.monotonic()
    for _ in range(4):
        limited.judge(frames, task.task, task.requirement, "visual", task.rubrics["visual"])
    assert time.monotonic() - started >= 0.3


def test_config_from_env(monkeypatch):
    monkeypatch.delenv("MICROVERSE_JUDGE_BASE_URL", raising=False)
    assert JudgeConfig.from_env() is None
    monkeypatch.setenv("MICROVERSE_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MICROVERSE_JUDGE_MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("MICROVERSE_JUDGE_RPM", "30")
    config = JudgeConfig.from_env()
    assert (config.base_url, config.model, config.rpm, config.api_key) == (
        "http://127.0.0.1:9/v1",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        30,
        "EMPTY",
    )
    with pytest.raises(ValueError, match="base_url"):
        VLMJudge(JudgeConfig(base_url=""))
    assert json.loads(config.model_dump_json())["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
