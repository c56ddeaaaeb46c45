"""What every route shares: the runtime from ``app.state``, the caller (API key check, job owner) and the
one request-body parser (JSON, multipart or urlencoded, with a size limit enforced while the body streams in)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response, validation_message
from .jobs import Job
from .runtime import Runtime

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
UNPROTECTED = ("/livez", "/readyz", "/healthz", "/ui")  # the page holds no data; its API calls send the key
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a JSON body or a JSON form field."""


def get_runtime(request: Request) -> Runtime:
    """The service's runtime; 503 while the service is starting."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise APIError(503, "the service is starting", None, "starting", {"Retry-After": "5"})
    return rt


def get_engine_runtime(request: Request) -> Runtime:
    """The runtime of a service whose model is loaded; 503 naming the load error otherwise."""
    rt = get_runtime(request)
    if rt.engine is None or rt.load_error is not None:
        raise APIError(503, f"the model is not loaded: {rt.load_error}", None, "model_not_loaded")
    return rt


def owner_of(request: Request) -> str | None:
    """The tenant the caller's jobs belong to: a stable, non-secret id of ``MICROVERSE_API_KEY`` (the key check
    already made sure the caller sent it), or None without a key: then every caller is one anonymous tenant and
    the ``Authorization`` header decides nothing."""
    key = get_runtime(request).settings.api_key
    return hashlib.sha256(_bearer(key).encode()).hexdigest()[:16] if key is not None else None


def owns(owner: str | None, job: Job) -> bool:
    """Whether the caller ``owner`` (:func:`owner_of`) may see ``job``: without an API key every job, with one
    only the jobs made with it."""
    return owner is None or job.owner == owner


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EngineRuntimeDep = Annotated[Runtime, Depends(get_engine_runtime)]
OwnerDep = Annotated[str | None, Depends(owner_of)]


async def check_api_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP middleware of the FastAPI app: with ``MICROVERSE_API_KEY`` set, every route but the probes and the
    page needs ``Authorization: Bearer <key>`` (compared in constant time)."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    key = rt.settings.api_key if rt is not None else None
    refusal = api_key_refusal(request, key) if key is not None else None
    return refusal if refusal is not None else await call_next(request)


class RequireApiKey:
    """Pure ASGI middleware with :func:`check_api_key`'s rule for everything the server answers, so BentoML's own
    routes (``/metrics``, ``/docs.json``, ``/schema.json``, its index page) need the key too."""

    def __init__(self, app: ASGIApp, key: SecretStr) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = api_key_refusal(Request(scope), self.key) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def api_key_refusal(request: Request, key: SecretStr) -> Response | None:
    """The 401 for a request without ``Authorization: Bearer <key>`` (compared in constant time), or None when it
    may pass: it carries the key, asks for a probe or the page, or is a CORS preflight (browsers send no key)."""
    preflight = request.method == "OPTIONS" and "access-control-request-method" in request.headers
    given = request.headers.get("authorization", "")
    if preflight or request.url.path.startswith(UNPROTECTED) or hmac.compare_digest(given.encode(),
                                                                                      _bearer(key).encode()):
        return None
    return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def _bearer(key: SecretStr) -> str:
    return f"Bearer {key.get_secret_value()}"


@dataclass(frozen=True)
class BodyRules:
    """How one route reads its request body."""

    max_bytes: int = 64 * 1024
    """Largest body accepted; a larger one is answered 413."""
    upload: str | None = None
    """The form field that may carry a file (its bytes come back apart from the model); None: no files."""
    json_fields: tuple[str, ...] = ()
    """Form fields whose value is a JSON object (a JSON body carries them as objects already)."""


SMALL_BODY = BodyRules()
"""The rules of ``/generate`` and ``/v1/videos`` bodies without an image: 64 KiB, no files."""


def image_body_rules(request: Request, takes_image: bool, field: str) -> BodyRules:
    """The rules of a generation body that may carry a reference image in ``field``: room for the image when the
    model takes one or the body is multipart (so an image sent to a text-only model is answered 400 naming
    ``field``, not 413); else :data:`SMALL_BODY`."""
    from .images import MAX_IMAGE_BYTES

    if takes_image or request.headers.get("content-type", "").startswith("multipart/form-data"):
        return BodyRules(max_bytes=SMALL_BODY.max_bytes + MAX_IMAGE_BYTES * 4 // 3, upload=field)
    return SMALL_BODY


async def read_body(request: Request, model: type[M], rules: BodyRules = SMALL_BODY) -> tuple[M, bytes | None]:
    """JSON, multipart or urlencoded body -> (``model``, the uploaded file's bytes or None).

    The size limit holds while the body streams in, chunked or not: 413 before anything is read when
    Content-Length is over ``rules.max_bytes``, else as soon as more than that has arrived. 400 naming the field
    on any other problem (malformed or over-deep JSON included).
    """
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit():  # int() would refuse 4300+ digits; 19 are over any limit
        _check_size(int(declared) if len(declared) < 19 else sys.maxsize, rules)
    capped = Request(request.scope, _capped_receive(request.receive, rules))
    if request.headers.get("content-type", "").startswith(FORM_TYPES):
        data, upload = await _form_data(capped, rules)
    else:
        data, upload = _json_object(await capped.body()), None
    try:
        return model.model_validate(data), upload
    except ValidationError as exc:
        param, message = validation_message(exc.errors()[0])
        raise APIError(400, message, param, "invalid_value") from None


def _capped_receive(receive: Receive, rules: BodyRules) -> Receive:
    """``receive`` that raises the 413 as soon as the body chunks it passed on add up to more than the limit."""
    received = 0

    async def capped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            _check_size(received, rules)
        return message

    return capped


def _check_size(size: int, rules: BodyRules) -> None:
    if size > rules.max_bytes:
        raise APIError(413, f"request body is larger than {rules.max_bytes} bytes", rules.upload, "body_too_large")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = _loads(raw or b"null", "body", "invalid_json")
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "body", "invalid_json")
    return data


def _loads(text: bytes | str, param: str, code: str) -> Any:
    """``json.loads``, but 400 naming ``param`` when arrays and objects nest deeper than ``MAX_JSON_DEPTH`` (the
    parser itself gives up with a RecursionError a little below 1000); ValueError when malformed."""
    too_deep = APIError(400, f"{param} nests arrays and objects deeper than {MAX_JSON_DEPTH} levels", param, code)
    try:
        data = json.loads(text)
    except RecursionError:
        raise too_deep from None
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:  # iterative, so a deep value cannot exhaust the stack here either
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_JSON_DEPTH:
                    raise too_deep
                pending.append((child, depth + 1))
    return data


async def _form_data(request: Request, rules: BodyRules) -> tuple[dict[str, Any], bytes | None]:
    """The form's fields (``json_fields`` decoded) and the bytes of the file in ``rules.upload``."""
    data: dict[str, Any] = {}
    upload = None
    async with request.form(max_part_size=rules.max_bytes) as form:
        for key, value in form.multi_items():
            if isinstance(value, str):
                data[key] = _json_field(key, value) if key in rules.json_fields else value
            elif key == rules.upload:
                upload = await value.read()
            elif rules.upload is None:
                raise APIError(400, f"file uploads are not supported for '{key}'", key, "unsupported")
            else:
                raise APIError(400, f"unexpected file field '{key}'; upload the {rules.upload} as "
                               f"'{rules.upload}'", key, "invalid_value")
    return data, upload


def _json_field(key: str, value: str) -> Any:
    try:
        return _loads(value, key, "invalid_value")
    except ValueError:
        raise APIError(400, f"{key} must be a JSON object", key, "invalid_value") from None
