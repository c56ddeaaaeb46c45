"""Hostile input that used to answer 500 (issue 20, items 2, 6 and 9): each attack now gets a 4xx (or the 507 of a
full disk) in OpenAI's error shape naming the field, and nothing is stored."""

from __future__ import annotations

import errno
import http.server
import ipaddress
import sqlite3
import threading
from collections.abc import Iterator

import pytest

from evaluation.judge import JudgeConfig
from evaluation.judge_api import JudgeInputError, JudgeService, fetch_public_video, is_public_address
from microverse.schemas import GenerationSpec

SURROGATE = '"cell \\ud800 divides"'
"""A lone surrogate as JSON source text: the JSON escape ``\\ud800``, so the body is valid JSON."""
SURROGATE_UTF7 = "cell +2AA- divides"
"""The same text in UTF-7, where ``+2AA-`` decodes to the lone surrogate U+D800."""
ALL_STATUSES = ("queued", "in_progress", "completed", "failed")


def post_json_source(client, path: str, fields: dict[str, str]):
    """POST a JSON object whose values are given as JSON source text (escapes and NaN literals survive)."""
    body = "{" + ", ".join(f'"{key}": {value}' for key, value in fields.items()) + "}"
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def post_form(client, path: str, fields: dict[str, str], charset: str = "utf-8"):
    """POST a multipart form declared as ``charset``; the ASCII values are taken as already in that charset."""
    parts = [f'--B\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n' for key, value in fields.items()]
    body = ("".join(parts) + "--B--\r\n").encode("ascii")
    content_type = f"multipart/form-data; boundary=B; charset={charset}"
    return client.post(path, content=body, headers={"content-type": content_type})


def assert_refused(resp, status: int, param: str) -> dict:
    """``resp`` is the OpenAI-shaped error ``status`` naming ``param``; returns the error object."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error" and param.split(".")[-1] in err["message"], err
    return err


def assert_nothing_stored(client) -> None:
    """No job was stored, and the list still answers."""
    listing = client.get("/v1/videos")
    assert listing.status_code == 200 and listing.json()["data"] == [], listing.text
    assert client.app.state.runtime.store.count(ALL_STATUSES) == 0


TEXT_FIELDS = [("/v1/videos", "prompt"), ("/v1/videos", "negative_prompt"), ("/v1/videos", "model"),
               ("/v1/videos", "size"), ("/generate", "prompt"), ("/generate", "negative_prompt")]
"""Every free-text field of the routes that make videos (one in-process service serves them all)."""


def test_lone_surrogates_are_refused_at_the_edge(make_client):
    client = make_client()
    for path, field in TEXT_FIELDS:
        err = assert_refused(post_json_source(client, path, {"prompt": '"a cell"', field: SURROGATE}), 400, field)
        assert "surrogate" in err["message"]
        form = {"prompt": "a cell", field: SURROGATE_UTF7}
        assert_refused(post_form(client, path, form, charset="utf-7"), 400, field)
    assert_nothing_stored(client)


def test_a_surrogate_in_a_field_name_is_refused_and_echoed_escaped(make_client):
    client = make_client()
    resp = post_json_source(client, "/v1/videos", {"prompt": '"a cell"', "\\ud800": "1"})
    assert_refused(resp, 400, "body")
    file_part = '--B\r\nContent-Disposition: form-data; name="+2AA-"; filename="a.bin"\r\n\r\nxx\r\n--B--\r\n'
    resp = client.post("/v1/videos", content=file_part.encode("ascii"),
                       headers={"content-type": "multipart/form-data; boundary=B; charset=utf-7"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "\\ud800", resp.text
    assert_nothing_stored(client)


def test_the_list_survives_rows_that_cannot_be_rendered(make_client):
    """Rows stored before the edge refused surrogates, or corrupted ones, must not make the list a 500."""
    client = make_client()
    store, model = client.app.state.runtime.store, client.app.state.runtime.engine.model.name
    spec = GenerationSpec(prompt="cell \ud800 divides", negative_prompt="", height=32, width=32, num_frames=5,
                          num_inference_steps=1, guidance_scale=1.0, seed=1, fps=8)
    legacy = store.create(spec, model)
    shown = client.get(f"/v1/videos/{legacy.id}")
    assert shown.status_code == 200 and shown.json()["prompt"] == "cell \\ud800 divides"
    broken = store.create(spec, model)
    store._execute("UPDATE jobs SET status='bogus' WHERE id=?", (broken.id,))
    listing = client.get("/v1/videos")
    assert listing.status_code == 200, listing.text
    assert [v["id"] for v in listing.json()["data"]] == [legacy.id]


NON_FINITE_JSON = ["NaN", "Infinity", "-Infinity", "1e308", "1e400"]
NON_FINITE_FORM = ["nan", "inf", "-inf", "Infinity", "1e308"]


def test_non_finite_or_huge_seconds_are_refused(make_client):
    client = make_client()
    for value in NON_FINITE_JSON:
        assert_refused(post_json_source(client, "/v1/videos", {"prompt": '"a cell"', "seconds": value}), 400,
                       "seconds")
    for value in NON_FINITE_FORM:
        assert_refused(post_form(client, "/v1/videos", {"prompt": "a cell", "seconds": value}), 400, "seconds")
    huge_fps = {"prompt": '"a cell"', "seconds": "1", "fps": str(10**30)}
    assert_refused(post_json_source(client, "/v1/videos", huge_fps), 400, "fps")
    assert_nothing_stored(client)


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    """The error SQLite raises with result code ``code``."""
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    return exc


STORAGE_FAULTS = [
    (OSError(errno.ENOSPC, "No space left on device"), 507),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 507),
    (sqlite_error("database or disk is full", sqlite3.SQLITE_FULL), 507),
    (sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR), 503),
]
"""A write fault of the job store and the status it is answered with (507: no space, as a video write)."""


def test_a_storage_fault_at_job_creation_is_answered_and_stores_nothing(make_client, monkeypatch):
    client = make_client()
    store = client.app.state.runtime.store
    real_execute = store._execute
    for fault, status in STORAGE_FAULTS:

        def failing_writes(sql: str, params: tuple = (), fault: Exception = fault):
            if sql.lstrip().startswith("INSERT"):
                raise fault
            return real_execute(sql, params)

        monkeypatch.setattr(store, "_execute", failing_writes)
        for path, body in (("/v1/videos", {"prompt": "a cell", "size": "32x32"}), ("/generate", {"prompt": "a cell"})):
            resp = client.post(path, json=body)
            assert resp.status_code == status, (fault, resp.text)
            err = resp.json()["error"]
            assert err["code"] == "storage_error"
            assert err["type"] == ("server_error" if status == 507 else "service_unavailable")
            assert str(fault) not in err["message"]  # the details (paths) stay in the log
    monkeypatch.undo()
    assert_nothing_stored(client)


@pytest.fixture
def judge_client(make_client, bench_dir):
    """An in-process service with a judge configured; these requests are refused before any judge call."""
    client = make_client()
    config = JudgeConfig(base_url="http://127.0.0.1:9/v1", api_key="x", model="never-called")
    client.app.state.runtime.judge = JudgeService(config, benchmark=bench_dir)
    return client


BAD_URLS = ["http://example.com:99999/", "http://[::1/", "http://[2002:7f00:1::]/a.mp4",
            "http://[64:ff9b::7f00:1]/a.mp4", "http://[2001:0:808:808:0:0:80ff:fffe]/a.mp4"]
"""A port out of range, a broken IPv6 literal (both refused unparsed), and loopback as 6to4, NAT64 and Teredo
(refused before any connection)."""


def test_judge_refuses_malformed_and_disguised_loopback_urls(judge_client):
    for url in BAD_URLS:
        err = assert_refused(judge_client.post("/judge", json={"task_index": 1, "video_url": url}), 400, "video_url")
        assert ("non-public" in err["message"]) == url.endswith(".mp4") and "download" not in err["message"], err


def test_judge_refuses_overflowing_rubric_weights(judge_client):
    block = {"d1": "two cells", "s1": "+1", "w1": 1e308, "d2": "a wall", "s2": "+1", "w2": 1e308}
    rubric = {"task": "a cell divides", "rubrics_scientific": block}
    body = {"video_base64": "AAAA", "rubric": rubric}
    assert_refused(judge_client.post("/judge", json=body), 422, "rubric.rubrics_scientific.w1")
    as_text = '{"task": "x", "rubrics_visual": {"d1": "sharp", "s1": "+1", "w1": "1e308"}}'
    form = {"rubric": as_text, "video_base64": "AAAA"}
    assert_refused(post_form(judge_client, "/judge", form), 422, "rubric.rubrics_visual.w1")


BLOCK = '{"d1": "sharp", "s1": "+1", "w1": 1}'
JUDGE_SURROGATES = [
    ({"video_base64": '"AAAA"', "rubric": '{"task": ' + SURROGATE + ', "rubrics_visual": ' + BLOCK + "}"},
     "rubric.task"),
    ({"video_base64": '"AAAA"', "rubric": '{"requirement": ' + SURROGATE + ', "rubrics_visual": ' + BLOCK + "}"},
     "rubric.requirement"),
    ({"video_base64": '"AAAA"', "rubric": '{"rubrics_visual": {"d1": ' + SURROGATE + ', "s1": "+1", "w1": 1}}'},
     "rubric.rubrics_visual.d1"),
    ({"task_index": "1", "video_url": '"http://\\ud800.example/a.mp4"'}, "video_url"),
]
"""``/judge`` bodies (values as JSON source) with a lone surrogate, and the field it is in."""


def test_judge_refuses_lone_surrogates(judge_client):
    for fields, param in JUDGE_SURROGATES:
        err = assert_refused(post_json_source(judge_client, "/judge", fields), 400, param)
        assert "surrogate" in err["message"]


@pytest.mark.parametrize("address,public", [
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
    ("2002:c0a8:101::", False),  # 6to4 of 192.168.1.1
    ("2002:808:808::", True),  # 6to4 of 8.8.8.8
    ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254 (cloud metadata)
    ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
    ("64:ff9b:1::808:808", False),  # local-use NAT64 prefix
    ("2001:0:808:808:0:0:80ff:fffe", False),  # Teredo: client 127.0.0.1
    ("2001:0:a00:1:0:0:f7f7:f7f7", False),  # Teredo: server 10.0.0.1
    ("2001:0:808:808:0:0:f7f7:f7f7", True),  # Teredo: server and client 8.8.8.8
    ("::127.0.0.1", False),  # IPv4-compatible
    ("::ffff:127.0.0.1", False),  # IPv4-mapped
    ("2606:4700::1111", True),
])
def test_addresses_that_embed_ipv4_are_judged_by_it(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.fixture
def redirect_server() -> Iterator[str]:
    """Loopback server whose every answer redirects to a URL that does not parse."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://[::1/")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_fetch_refuses_urls_that_do_not_parse(redirect_server):
    only_loopback = lambda ip: str(ip) == "127.0.0.1"  # noqa: E731 - stands in for "public" on loopback
    for url in ("http://example.com:99999/a.mp4", "http://[::1/", redirect_server + "/a.mp4"):
        with pytest.raises(JudgeInputError) as err:
            fetch_public_video(url, 1_000_000, 5, allowed=only_loopback)
        assert err.value.field == "video_url" and err.value.status_code == 400, url
