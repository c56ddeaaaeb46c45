"""The library behind the service's /judge endpoint and the guarded URL fetch."""

from __future__ import annotations

import base64
import http.server
import ipaddress
import threading
import time

import pytest
from pydantic import ValidationError

from evaluation.judge_api import JudgeInputError, JudgeRequest, JudgeService, fetch_public_video, is_public_address


@pytest.fixture()
def service(judge_config, bench, tmp_path):
    return JudgeService(judge_config, bench, cache_path=tmp_path / "judge_cache.sqlite")


@pytest.fixture()
def video_bytes(tmp_path, make_video):
    return make_video(tmp_path / "clip.mp4").read_bytes()


def test_task_judgement_is_full_and_cached(service, video_bytes, fake_judge, bench):
    response = service.judge_video(video_bytes, task_index=277)
    assert response.task_index == 277 and [d.dimension for d in response.dimensions] == [
        "scientific",
        "visual",
        "instruction",
    ]
    instruction = response.dimensions[2]
    assert len(instruction.criteria) == 4  # the published 4-criterion block
    for dim in response.dimensions:
        crit = bench.tasks[277].rubrics[dim.dimension]
        assert [c.text for c in dim.criteria] == [c.text for c in crit]
        assert all(c.judgement in (0, 1) and c.reasoning for c in dim.criteria)
        assert dim.max == pytest.approx(sum(c.weight for c in crit if c.sign > 0))
        assert dim.score == pytest.approx(max(0.0, dim.raw / dim.max) * 100)
    pooled = max(0.0, sum(d.raw for d in response.dimensions) / sum(d.max for d in response.dimensions)) * 100
    assert response.task_score == pytest.approx(pooled)
    assert response.prompt_tokens > 0 and response.cost_usd > 0 and fake_judge.state.total_answered == 3
    again = service.judge_video(video_bytes, task_index=277)
    assert again.task_score == response.task_score and again.cost_usd == 0 and fake_judge.state.total_answered == 3


def test_custom_rubric_and_request_sources(service, video_bytes, tmp_path):
    rubric = {
        "task": "A cell divides.",
        "requirement": "Show mitosis.",
        "rubrics_visual": {"d1": "Sharp frames", "s1": "+1", "w1": "1.0", "d2": "Flicker", "s2": "-1", "w2": 0.5},
    }
    request = JudgeRequest(rubric=rubric, video_base64=base64.b64encode(video_bytes).decode())
    response = service.handle(request)
    assert response.task_index is None and [d.dimension for d in response.dimensions] == ["visual"]
    assert [c.kind for c in response.dimensions[0].criteria] == ["positive", "penalty"]
    path = tmp_path / "job.mp4"
    path.write_bytes(video_bytes)
    by_job = service.handle(JudgeRequest(task_index=1, job_id="job-1"), job_video={"job-1": path}.get)
    by_upload = service.handle(JudgeRequest(task_index=1), upload=video_bytes)
    assert by_job.task_score == by_upload.task_score and by_job.video_sha256 == by_upload.video_sha256


@pytest.mark.parametrize(
    ("kwargs", "field", "status"),
    [
        ({"task_index": 460}, "task_index", 404),
        ({"rubric": {"task": "x"}}, "rubric", 422),
        ({"rubric": {"rubrics_visual": {"d1": "a", "s1": "+1"}}}, "rubric.rubrics_visual", 422),
        ({"rubric": {"rubrics_visual": {"d1": "a", "s1": "maybe", "w1": 1}}}, "rubric.rubrics_visual", 422),
        ({"rubric": {"rubrics_visual": {"d1": "a", "s1": "-1", "w1": 1}}}, "rubric.rubrics_visual", 422),
    ],
)
def test_bad_task_or_rubric(service, video_bytes, kwargs, field, status):
    with pytest.raises(JudgeInputError) as err:
        service.handle(JudgeRequest(**kwargs), upload=video_bytes)
    assert (err.value.field, err.value.status_code) == (field, status)


def test_bad_video_input(service, fake_judge):
    with pytest.raises(JudgeInputError) as err:
        service.handle(JudgeRequest(task_index=1), upload=b"%PDF-1.4 not a video")
    assert err.value.field == "video" and "not a decodable video" in err.value.message
    with pytest.raises(JudgeInputError, match="base64"):
        service.handle(JudgeRequest(task_index=1, video_base64="***"))
    with pytest.raises(JudgeInputError) as err:
        service.handle(JudgeRequest(task_index=1, job_id="nope"), job_video=lambda _id: None)
    assert err.value.status_code == 404
    with pytest.raises(JudgeInputError, match="exactly one"):
        service.handle(JudgeRequest(task_index=1))
    with pytest.raises(JudgeInputError, match="larger than"):
        service.handle(JudgeRequest(task_index=1), upload=b"0" * 101, max_bytes=100)
    with pytest.raises(ValidationError):
        JudgeRequest(task_index=1, rubric={"task": "x"})
    assert fake_judge.state.total_answered == 0


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.mp4",
        "http://127.0.0.1/a.mp4",
        "http://localhost:8000/a.mp4",
        "http://10.1.2.3/a.mp4",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.mp4",
        "http://0.0.0.0/",
        "http://224.0.0.1/a.mp4",
        "http://user:pw@93.184.216.34/a.mp4",
        "gopher://x",
    ],
)
def test_forbidden_urls(service, url):
    with pytest.raises(JudgeInputError) as err:
        service.handle(JudgeRequest(task_index=1, video_url=url))
    assert err.value.field == "video_url" and err.value.status_code == 400


def test_public_address_rules():
    assert is_public_address(ipaddress.ip_address("93.184.216.34"))
    for private in (
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.1.1",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "240.0.0.1",
        "ff02::1",
    ):
        assert not is_public_address(ipaddress.ip_address(private)), private


@pytest.fixture()
def http_server(video_bytes):
    """Loopback server: /clip.mp4, /big (2 MB), /hop (redirect to 127.0.0.2), /slow."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/clip.mp4")
                self.end_headers()
                return
            if self.path == "/slow":
                self.send_response(200)
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"0" * 1000)
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            body = {"/clip.mp4": video_bytes, "/big": b"0" * 2_000_000}.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.end_headers()  # no content-length: the limit must hold while streaming
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_fetch_limits_and_redirect_checks(http_server, video_bytes):
    only_this = lambda ip: str(ip) == "127.0.0.1"  # noqa: E731 - stands in for "public" on loopback
    assert fetch_public_video(http_server + "/clip.mp4", 10_000_000, 5, allowed=only_this) == video_bytes
    with pytest.raises(JudgeInputError) as err:
        fetch_public_video(http_server + "/big", 1_000_000, 5, allowed=only_this)
    assert err.value.status_code == 413
    with pytest.raises(JudgeInputError, match="non-public"):
        fetch_public_video(http_server + "/hop", 10_000_000, 5, allowed=only_this)
    with pytest.raises(JudgeInputError) as err:
        fetch_public_video(http_server + "/slow", 10_000_000, 0.5, allowed=only_this)
    assert err.value.status_code == 408
    with pytest.raises(JudgeInputError, match="404"):
        fetch_public_video(http_server + "/missing", 10_000_000, 5, allowed=only_this)
    with pytest.raises(JudgeInputError, match="non-public"):
        fetch_public_video(http_server + "/clip.mp4", 10_000_000, 5)
