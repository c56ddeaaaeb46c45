"""What every route shares: the runtime from ``app.state``, the caller (API key check, job owner) and the
one request-body parser (JSON, multipart or urlencoded, with a size limit)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from .errors import APIError, error_response, validation_message
from .runtime import Runtime

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
UNPROTECTED = ("/livez", "/readyz", "/healthz", "/ui")  # the page holds no data; its API calls send the key


def get_runtime(request: Request) -> Runtime:
    """The service's runtime; 503 while the service is starting."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise APIError(503, "the service is starting", None, "starting", {"Retry-After": "5"})
    return rt


def get_engine_runtime(request: Request) -> Runtime:
    """The runtime of a service whose model is loaded; 503 naming the load error otherwise."""
    rt = get_runtime(request)
    if not rt.ready:
        raise APIError(503, f"the model is not loaded: {rt.load_error}", None, "model_not_loaded")
    return rt


def owner_of(request: Request) -> str | None:
    """A stable, non-secret id of the caller's API key (jobs are scoped to it), or None."""
    auth = request.headers.get("authorization", "")
    return hashlib.sha256(auth.encode()).hexdigest()[:16] if auth else None


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
EngineRuntimeDep = Annotated[Runtime, Depends(get_engine_runtime)]
OwnerDep = Annotated[str | None, Depends(owner_of)]


async def check_api_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP middleware: with ``MICROVERSE_API_KEY`` set, every route but the probes and the page needs
    ``Authorization: Bearer <key>`` (compared in constant time)."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    key = rt.settings.api_key if rt is not None else None
    if key is not None and not request.url.path.startswith(UNPROTECTED):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key.get_secret_value()}".encode()):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
    return await call_next(request)


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
"""The rules of ``/generate`` and ``/v1/videos``: 64 KiB, no files."""


async def read_body(request: Request, model: type[M], rules: BodyRules = SMALL_BODY) -> tuple[M, bytes | None]:
    """JSON, multipart or urlencoded body -> (``model``, the uploaded file's bytes or None).

    413 when larger than ``rules.max_bytes``; 400 naming the field on any other problem.
    """
    length = request.headers.get("content-length", "")
    _check_size(int(length) if length.isdigit() else 0, rules)
    is_form = request.headers.get("content-type", "").startswith(FORM_TYPES)
    if not (is_form and rules.upload):  # uploads stream into the form parser; other bodies are read whole
        _check_size(len(await request.body()), rules)
    data, upload = await _form_data(request, rules) if is_form else (_json_object(await request.body()), None)
    try:
        return model.model_validate(data), upload
    except ValidationError as exc:
        param, message = validation_message(exc.errors()[0])
        raise APIError(400, message, param, "invalid_value") from None


def _check_size(size: int, rules: BodyRules) -> None:
    if size > rules.max_bytes:
        raise APIError(413, f"request body is larger than {rules.max_bytes} bytes", rules.upload, "body_too_large")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"null")
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "body", "invalid_json")
    return data


async def _form_data(request: Request, rules: BodyRules) -> tuple[dict[str, Any], bytes | None]:
    """The form's fields (``json_fields`` decoded) and the bytes of the file in ``rules.upload``."""
    form = await request.form(max_part_size=rules.max_bytes)
    data: dict[str, Any] = {}
    upload = None
    for key, value in form.multi_items():
        if isinstance(value, str):
            data[key] = _json_field(key, value) if key in rules.json_fields else value
        elif key == rules.upload:
            upload = await value.read()
        elif rules.upload is None:
            raise APIError(400, f"file uploads are not supported for '{key}'", key, "unsupported")
        else:
            raise APIError(400, f"unexpected file field '{key}'; upload the {rules.upload} as '{rules.upload}'",
                           key, "invalid_value")
    return data, upload


def _json_field(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise APIError(400, f"{key} must be a JSON object", key, "invalid_value") from None
