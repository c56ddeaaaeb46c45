"""Fuzzing of every request body (issue 20): no 5xx and no stack trace, whatever the input.

- schemathesis generates the JSON bodies and parameters the OpenAPI spec describes;
- hypothesis builds what the spec cannot describe: the multipart (with file parts) and urlencoded forms of
  ``/v1/videos``, ``/generate`` and ``/judge``, and JSON source text with NaN / Infinity literals, numbers past
  float and int range, arrays and objects nested 5000 deep, bytes that are not UTF-8 and odd (surrogate-free)
  unicode. Every 4xx must be OpenAI's error shape naming a field of the route, one the request sent, ``body`` or
  ``video``.

One in-process service (tiny model, fake judge) answers them all; hypothesis runs derandomized, so a failure
repeats and is printed with its input.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from urllib.parse import urlencode

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from evaluation.judge_api import JudgeRequest
from microverse.api import create_app
from microverse.protocol import VideoCreateBody
from microverse.runtime import Runtime
from microverse.schemas import GenerateRequest

app = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
client = TestClient(app, raise_server_exceptions=False)


@schemathesis.hook
def before_call(context, case, *args):
    """Keep valid generations tiny: the budget is for inputs, not for denoising."""
    if isinstance(case.body, dict) and case.path in ("/generate", "/v1/videos"):
        for key in ("num_inference_steps",):
            if isinstance(case.body.get(key), int) and case.body[key] > 1:
                case.body[key] = 1


def setup_module(module):
    import tempfile
    from pathlib import Path

    from evaluation.fake_judge import FakeJudgeServer
    from evaluation.judge import JudgeConfig
    from evaluation.judge_api import JudgeService
    from microverse.config import Settings
    from microverse.tools.tiny import save_tiny_pipeline
    from tests.synthetic_microworldbench import write_microworldbench

    tmp = tempfile.mkdtemp(prefix="microverse-fuzz-")
    app.state.runtime = Runtime.start(Settings(
        model=str(save_tiny_pipeline(f"{tmp}/model")), storage_dir=f"{tmp}/storage",
        max_pixels=32 * 32, max_frames=5, max_steps=2, max_queue=1000, max_active_per_key=1000,
        request_timeout_s=30))
    module.judge_server = FakeJudgeServer().start()
    app.state.runtime.judge = JudgeService(
        JudgeConfig(base_url=module.judge_server.base_url, api_key="x", model="fake-judge"),
        benchmark=write_microworldbench(Path(tmp) / "microworldbench"))


def teardown_module(module):
    app.state.runtime.stop()
    module.judge_server.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
    assert "Traceback" not in response.text


# --- hypothesis: forms and JSON source text -------------------------------------------------------------------

ROUTES = {"/v1/videos": VideoCreateBody, "/generate": GenerateRequest, "/judge": JudgeRequest}
FIELDS = {path: (*model.model_fields, "unknown_field") for path, model in ROUTES.items()}
"""Each route's body fields (from its model), and one it does not know."""
NAMED = {**FIELDS, "/v1/videos": (*FIELDS["/v1/videos"], *GenerateRequest.model_fields)}
"""The fields a route's 4xx may name: its own; for ``/v1/videos`` also those its ``size`` and ``seconds`` map to."""


@functools.cache
def tiny_mp4() -> bytes:
    """A decodable 9-frame 32x32 mp4, so that some judge requests reach the (fake) judge."""
    import numpy as np

    from media.video import encode_mp4

    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    return encode_mp4(frames, 8)


MP4 = st.deferred(lambda: st.just(tiny_mp4()))
MP4_BASE64 = st.deferred(lambda: st.just(base64.b64encode(tiny_mp4()).decode()))

VALID_BLOCK = {"d1": "Two cells at the end", "s1": "+1", "w1": 1.0, "d2": "The cell bursts", "s2": "-1", "w2": 0.5}
VALID = {
    "prompt": ("a cell divides",), "negative_prompt": ("blur",), "model": ("microverse",), "size": ("32x32",),
    "seconds": (0.5, 1e-9), "seed": (7,), "num_inference_steps": (1, 2), "guidance_scale": (1.5,),
    "num_frames": (5,), "fps": (8,), "height": (32, 16), "width": (32,), "preset": ("exact", "fast"),
    "task_index": (1, 459), "job_id": ("video_" + "0" * 32,), "video_url": ("http://127.0.0.1:1/x.mp4",),
    "rubric": ({"task": "a cell divides", "rubrics_scientific": VALID_BLOCK},),
}
"""Values each field accepts, so that some requests pass validation and go deeper (queue, engine, judge)."""

NUMBER_TEXT = ("NaN", "nan", "-NaN", "Infinity", "-Infinity", "inf", "1e308", "-1e308", "1e309", "4.9e-324",
               "9" * 5000, "-" + "9" * 20, str(2**63), str(2**64), "0", "-1", "1", "0x10", "1_000", " 2 ", "",
               "true", "null")
"""Numbers as form text: non-finite, past float and int64 range, past Python's int-string limit, odd forms."""
NESTED_TEXT = ("[" * 5000, "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000, '{"d1":' * 5000,
               "[" * 32 + "]" * 32, "[" * 33 + "]" * 33, "{}", "[]")
"""JSON nested 5000 deep (closed or not) and around the limit of 32 levels."""
URLS = ("http://[::1/", "http://127.0.0.1:99999/x.mp4", "http://localhost:0/x", "http://[::ffff:127.0.0.1]/x",
        "http://[2002:7f00:1::]/x", "http://0x7f.1/x", "http://user:pw@127.0.0.1/x", "file:///etc/passwd",
        "ftp://127.0.0.1/x", "javascript:alert(1)", "http:///x", "https://[fe80::1]/x")
"""Hostile ``video_url`` values that need no DNS (this machine may have none)."""
ODD_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ("\x00", "\u202e\u2066evil", "\ufeffbom", "\U0001d538\U0001d539", "e\u0301" * 50, "a" * 2001, "\r\n", "%00",
     "../../etc/passwd", " "))
"""Surrogate-free unicode: control and format characters, astral planes, combining marks, over-long text."""
RAW_BYTES = (b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf", b"caf\xe9")
"""Bytes that are not UTF-8 (an encoded surrogate and an overlong form among them)."""
FILES = st.sampled_from((b"", b"not a video", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, b"[" * 5000)) | MP4

NUMBERS = st.sampled_from((math.nan, math.inf, -math.inf, 1e308, 10**400, 2**63, -1, 0, 1, 0.5, "1", "NaN", "1e309"))
"""JSON numbers (and numbers as strings) for rubric weights: non-finite, past float range, negative, ordinary."""
JSON_SCALARS = NUMBERS | st.sampled_from(("+1", "-1", "+7", "", " ", None, True, [], {}))
RUBRIC_KEYS = st.sampled_from(("d1", "s1", "w1", "d2", "s2", "w2", "d11", "s11", "w11", "w0", "x", "d\u0661",
                               "d" + "1" * 5000))
CRITERION = st.fixed_dictionaries({"d1": st.just("two cells") | JSON_SCALARS, "s1": st.sampled_from(("+1", "-1")),
                                   "w1": NUMBERS})
BLOCKS = (st.dictionaries(RUBRIC_KEYS, JSON_SCALARS | ODD_TEXT, max_size=6) | CRITERION
          | st.sampled_from((VALID_BLOCK, [], "d1", None)))
RUBRICS = st.fixed_dictionaries({}, optional={
    "task": ODD_TEXT, "requirement": ODD_TEXT, "rubrics_scientific": BLOCKS, "rubrics_visual": BLOCKS,
    "rubrics_instruction": BLOCKS, "unknown": JSON_SCALARS}) | st.sampled_from(VALID["rubric"])
"""Custom rubrics: weights NaN, infinite, past float range; keys past the int-string limit; wrong shapes."""
SKELETONS = {
    "/v1/videos": [{"prompt": st.just("a cell divides"), "size": st.just("32x32"), "num_frames": st.just(5),
                    "num_inference_steps": st.just(1)}],
    "/generate": [{"prompt": st.just("a cell divides"), "height": st.just(32), "width": st.just(32),
                   "num_frames": st.just(5), "num_inference_steps": st.just(1)}],
    "/judge": [{"video_base64": MP4_BASE64, "rubric": RUBRICS}, {"video_base64": MP4_BASE64, "task_index": NUMBERS}],
}
"""Valid requests of each route (typed values); a deep request is one of them with some fields then made hostile,
so the fuzz reaches the checks behind the first validation (the engine's limits, the rubric parser, the judge).
At most two of its fields are changed: more would mostly trip the first check again."""


def form_values(name: str) -> st.SearchStrategy[str | bytes]:
    """What a form field ``name`` may carry."""
    hostile = st.sampled_from(NUMBER_TEXT + NESTED_TEXT + URLS + RAW_BYTES) | ODD_TEXT
    valid = [st.sampled_from([v if isinstance(v, str) else json.dumps(v) for v in VALID.get(name, ())])]
    extra = {"rubric": [RUBRICS.map(json.dumps)], "video_base64": [MP4_BASE64]}.get(name, [])
    return st.one_of(*(valid if name in VALID else []), *extra, hostile)


def json_values(name: str) -> st.SearchStrategy[str]:
    """What a JSON body member ``name`` may carry, as JSON source text (``NaN`` and ``Infinity`` are literals)."""
    literals = ("NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1e309", "-1e400", "1e-400", "9" * 4000,
                "9" * 5000, "-0", "true", "null", '"NaN"', '"Infinity"', '"1e309"', '"\\u0000"', *NESTED_TEXT)
    hostile = st.sampled_from(literals) | ODD_TEXT.map(json.dumps) | st.sampled_from(URLS).map(json.dumps)
    valid = [st.sampled_from([json.dumps(v) for v in VALID[name]])] if name in VALID else []
    extra = {"rubric": [RUBRICS.map(json.dumps)], "video_base64": [MP4_BASE64.map(json.dumps)]}.get(name, [])
    return st.one_of(*valid, *extra, hostile)


BOUNDARY = "microverse-fuzz-7c1f0e"


@st.composite
def skeletons(draw, path: str) -> dict:
    """Half the time one of ``path``'s :data:`SKELETONS` (typed values), else nothing."""
    if not draw(st.booleans()):
        return {}
    return {name: draw(value) for name, value in draw(st.sampled_from(SKELETONS[path])).items()}


@st.composite
def form_requests(draw, path: str) -> tuple[bytes, str, set[str]]:
    """(body, content type, the field names sent) of a multipart or urlencoded ``path`` request."""
    fields = {name: value if isinstance(value, str) else json.dumps(value)
              for name, value in draw(skeletons(path)).items()}
    names = draw(st.lists(st.sampled_from(FIELDS[path]), unique=True, max_size=2 if fields else 8))
    fields.update((name, draw(form_values(name))) for name in names)
    files = draw(st.lists(st.tuples(st.sampled_from(("video", "prompt", "rubric", "attachment")), FILES),
                          max_size=2, unique_by=lambda f: f[0]))
    if draw(st.integers(0, 3)) == 0:  # urlencoded: no files
        return urlencode(list(fields.items())).encode(), "application/x-www-form-urlencoded", set(fields)
    charset = draw(st.sampled_from(("", "; charset=utf-8", "; charset=latin-1", "; charset=utf-7")))
    body, content_type = multipart(fields, files)
    return body, content_type + charset, set(fields) | {name for name, _ in files}


def multipart(fields: dict[str, str | bytes], files: list[tuple[str, bytes]] = ()) -> tuple[bytes, str]:
    """(body, content type) of a multipart form with ``fields`` (text as UTF-8) and ``files``."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
             + (value if isinstance(value, bytes) else value.encode()) + b"\r\n" for name, value in fields.items()]
    parts += [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="v.mp4"\r\n'
              f"Content-Type: video/mp4\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


WHOLE_BODIES = (b"", b"NaN", b"Infinity", b"[" * 5000, b"[" * 5000 + b"]" * 5000, b'{"prompt":' * 5000, b"{",
                b"null", b"[]", b'"x"', b'{"prompt": "a cell"}x', "\ufeff{}".encode(), b'{"prompt": "\xff\xfe"}',
                b'{"prompt": "a cell", "prompt": NaN}', b'{"a": 1}' * 3000)
"""Whole JSON bodies that are no object, are malformed, nest 5000 deep or are not UTF-8."""


@st.composite
def json_requests(draw, path: str) -> tuple[bytes, str, set[str]]:
    """(body, content type, the field names sent) of a JSON ``path`` request written as source text."""
    content_type = draw(st.sampled_from(("application/json", "application/json; charset=latin-1", "text/plain", "")))
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from(WHOLE_BODIES)), content_type, set()
    members = {name: json.dumps(value) for name, value in draw(skeletons(path)).items()}
    names = draw(st.lists(st.sampled_from(FIELDS[path]), unique=True, max_size=2 if members else 8))
    members.update((name, draw(json_values(name))) for name in names)
    source = ", ".join(f"{json.dumps(name)}: {value}" for name, value in members.items())
    return ("{" + source + "}").encode(), content_type, set(members)


def assert_handled(response, path: str, sent: set[str]) -> None:
    """No 5xx and no traceback; a 4xx is the error shape naming a field of the route or one sent (the size limit
    names none); a judgement's score is finite and in range."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if response.status_code != 413:
            assert str(err["param"]).split(".")[0] in {*NAMED[path], *sent, "body", "video"}, (err, sent)
    elif path == "/judge":
        assert 0 <= response.json()["task_score"] <= 100, response.text


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path", list(ROUTES))
@FUZZ
@given(data=st.data())
def test_forms_never_answer_5xx(path, data):
    body, content_type, sent = data.draw(form_requests(path), label="request")
    assert_handled(client.post(path, content=body, headers={"content-type": content_type}), path, sent)


@pytest.mark.parametrize("path", list(ROUTES))
@FUZZ
@given(data=st.data())
def test_json_source_never_answers_5xx(path, data):
    body, content_type, sent = data.draw(json_requests(path), label="request")
    headers = {"content-type": content_type} if content_type else {}
    assert_handled(client.post(path, content=body, headers=headers), path, sent)


RUBRIC_WITH = '{"task": "x", "rubrics_visual": {"d1": "two cells", "s1": "+1", "w1": %s}}'
KNOWN_ATTACKS = {
    "seconds NaN": ("/v1/videos", {"prompt": '"a cell"', "seconds": "NaN"}),
    "seconds Infinity": ("/v1/videos", {"prompt": '"a cell"', "seconds": "Infinity"}),
    "seconds 1e308": ("/v1/videos", {"prompt": '"a cell"', "seconds": "1e308", "fps": "8"}),
    "guidance NaN": ("/generate", {"prompt": '"a cell"', "guidance_scale": "NaN"}),
    "prompt nested 5000 deep": ("/v1/videos", {"prompt": "[" * 5000 + "]" * 5000}),
    "rubric nested 5000 deep": ("/judge", {"video_base64": "MP4", "rubric": '{"a":' * 5000 + "1" + "}" * 5000}),
    "url port 99999": ("/judge", {"task_index": "1", "video_url": '"http://127.0.0.1:99999/x.mp4"'}),
    "url unclosed bracket": ("/judge", {"task_index": "1", "video_url": '"http://[::1/"'}),
    "weight 1e308": ("/judge", {"video_base64": "MP4", "rubric": RUBRIC_WITH % "1e308"}),
    "weight NaN": ("/judge", {"video_base64": "MP4", "rubric": RUBRIC_WITH % "NaN"}),
    "weight past float range": ("/judge", {"video_base64": "MP4", "rubric": RUBRIC_WITH % ("1" + "0" * 400)}),
    "criterion number of 5000 digits": ("/judge", {"video_base64": "MP4",
                                                   "rubric": '{"rubrics_visual": {"d%s": "x"}}' % ("1" * 5000)}),
}
"""Inputs that answered 500 once (issue 20, item 6, and what this fuzz found), as JSON source text per field;
``MP4`` stands for a decodable video's base64."""


@pytest.mark.parametrize("encoding", ["json", "multipart"])
@pytest.mark.parametrize("attack", list(KNOWN_ATTACKS))
def test_known_attacks_are_refused(attack, encoding):
    path, fields = KNOWN_ATTACKS[attack]
    fields = {name: json.dumps(base64.b64encode(tiny_mp4()).decode()) if value == "MP4" else value
              for name, value in fields.items()}
    if encoding == "json":
        body = ("{" + ", ".join(f'"{name}": {value}' for name, value in fields.items()) + "}").encode()
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:  # a form field carries the string itself, anything else as JSON text
        body, content_type = multipart({name: json.loads(value) if value.startswith('"') else value
                                        for name, value in fields.items()})
        response = client.post(path, content=body, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, f"{attack} ({encoding}): {response.status_code} {response.text[:300]}"
    assert_handled(response, path, set(fields))


def test_the_service_still_answers_after_fuzzing():
    listing = client.get("/v1/videos", params={"limit": 100})
    assert listing.status_code == 200 and listing.json()["object"] == "list", listing.text
    assert client.get("/info").json()["ready"] is True
