"""``/judge`` through HTTP on the real service: full judgements and 4xx for bad input."""

import base64
import json

import httpx
import openai
import pytest

from evaluation.fake_judge import FakeJudgeServer


@pytest.fixture(scope="module")
def judge_server():
    with FakeJudgeServer() as server:
        yield server


@pytest.fixture
def judged_service(start_server, judge_server, bench_dir):
    return start_server(MICROVERSE_JUDGE_BASE_URL=judge_server.base_url, MICROVERSE_JUDGE_MODEL="fake-judge",
                        MICROVERSE_JUDGE_API_KEY="test", MICROVERSE_BENCHMARK=bench_dir)


def test_judge_endpoint(judged_service):
    url = judged_service.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    video = client.videos.create_and_poll(prompt="a cell divides", size="64x64", seconds="1",
                                          extra_body={"num_inference_steps": 2, "seed": 1})
    resp = httpx.post(url + "/judge", json={"job_id": video.id, "task_index": 1}, timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {d["dimension"] for d in body["dimensions"]} == {"scientific", "visual", "instruction"}
    for dim in body["dimensions"]:
        assert dim["criteria"] and all(c["judgement"] in (0, 1) and c["reasoning"] for c in dim["criteria"])
        assert 0 <= dim["score"] <= 100
    assert 0 <= body["task_score"] <= 100 and body["judge_model"] == "fake-judge"

    mp4 = client.videos.download_content(video.id).read()
    upload = httpx.post(url + "/judge", files={"video": ("v.mp4", mp4, "video/mp4")}, data={"task_index": "1"},
                        timeout=120)
    assert upload.status_code == 200 and upload.json()["task_score"] == body["task_score"]
    rubric = {"task": "a cell divides", "requirement": "two daughter cells",
              "rubrics_scientific": {"d1": "Two cells at the end", "s1": "+1", "w1": 1.0}}
    custom = httpx.post(url + "/judge", json={"video_base64": base64.b64encode(mp4).decode(), "rubric": rubric},
                        timeout=120)
    assert custom.status_code == 200 and [d["dimension"] for d in custom.json()["dimensions"]] == ["scientific"]

    bad = [
        ({"job_id": video.id, "task_index": 99999}, 404, "task_index"),
        ({"job_id": video.id, "rubric": {"task": "x", "rubrics_visual": {"d1": "a", "s1": "+7"}}}, 422,
         "rubric.rubrics_visual"),
        ({"job_id": video.id, "rubric": {"task": "x"}}, 422, "rubric"),
        ({"video_url": "http://127.0.0.1:1/x.mp4", "task_index": 1}, 400, "video_url"),
        ({"video_url": "file:///etc/passwd", "task_index": 1}, 400, "video_url"),
        ({"job_id": "video_" + "0" * 32, "task_index": 1}, 404, "job_id"),
        ({"task_index": 1}, 400, "video"),
        ({"job_id": video.id}, 400, "body"),
    ]
    for payload, status, param in bad:
        r = httpx.post(url + "/judge", json=payload, timeout=60)
        assert r.status_code == status and r.json()["error"]["param"] == param, (payload, r.text)
    not_video = httpx.post(url + "/judge", files={"video": ("x.pdf", b"%PDF-1.4 not a video", "application/pdf")},
                           data={"task_index": "1"}, timeout=60)
    assert not_video.status_code == 422 and not_video.json()["error"]["param"] == "video"
    malformed = httpx.post(url + "/judge", files={"video": ("v.mp4", mp4, "video/mp4")},
                           data={"task_index": "1", "rubric": "{not json"}, timeout=60)
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "rubric"


def test_judge_without_configuration_says_how(microverse_server):
    r = httpx.post(microverse_server + "/judge", json={"task_index": 1, "job_id": "video_" + "0" * 32})
    assert r.status_code == 503 and "MICROVERSE_JUDGE_BASE_URL" in r.json()["error"]["message"]
    assert json.loads(httpx.get(microverse_server + "/info").text)["judge"] is None
