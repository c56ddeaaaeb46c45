"""One error shape for every route: OpenAI's ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from evaluation.judge import JudgeConfigError, JudgeError
from evaluation.judge_api import JudgeInputError

from .jobs import DatabaseUnusable, is_corruption
from .pgjobs import DatabaseUnavailable

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered with ``status`` in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error shape as a response; ``type`` follows from the status."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": printable(message), "type": kind,
                      "param": None if param is None else printable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def printable(text: str) -> str:
    """``text`` with whatever UTF-8 cannot encode (a lone surrogate) written as a backslash escape.

    For text that echoes a client's input in a response: it must never make the response unencodable.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def field_name(loc: tuple) -> str:
    """``("body", "height")`` -> ``height``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form")]
    return ".".join(parts) or "body"


def validation_message(err: dict[str, Any]) -> tuple[str, str]:
    """A pydantic error -> (the field at fault, a message naming it)."""
    name = field_name(tuple(err.get("loc", ())))
    if err.get("type") == "extra_forbidden":
        return name, f"unknown field '{name}'"
    if err.get("type") == "missing":
        return name, f"'{name}' is required"
    return name, f"{name}: {err.get('msg', 'invalid value')}"


def install_handlers(app: FastAPI) -> None:
    """Map every exception to the error shape; never leak a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(JudgeInputError)
    async def _judge_input(request: Request, exc: JudgeInputError) -> JSONResponse:
        message = exc.message if exc.field in exc.message else f"{exc.field}: {exc.message}"
        return error_response(exc.status_code, message, exc.field, "invalid_value")

    @app.exception_handler(JudgeError)
    async def _judge_failed(request: Request, exc: JudgeError) -> JSONResponse:
        return error_response(502, f"the judge model failed: {exc}", None, "judge_failed")

    @app.exception_handler(JudgeConfigError)
    async def _judge_config(request: Request, exc: JudgeConfigError) -> JSONResponse:
        return error_response(502, f"the judge model refused the configuration: {exc}", None, "judge_misconfigured")

    @app.exception_handler(DatabaseUnusable)
    async def _database_unusable(request: Request, exc: DatabaseUnusable) -> JSONResponse:
        return error_response(503, str(exc), None, "storage_unavailable")

    @app.exception_handler(DatabaseUnavailable)
    async def _database_unreachable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        logger.error("job database unreachable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "the job database cannot be reached; retry later", None, "storage_unavailable",
                              {"Retry-After": "5"})  # fmt: skip

    @app.exception_handler(sqlite3.Error)
    async def _database_failed(request: Request, exc: sqlite3.Error) -> JSONResponse:
        logger.error("job database error on %s %s: %s", request.method, request.url.path, exc)
        runtime = getattr(request.app.state, "runtime", None)
        if is_corruption(exc) and runtime is not None:  # not ready from now on: the operator recovers it
            runtime.store_damaged(str(exc))
            return error_response(503, str(DatabaseUnusable(runtime.store_error)), None, "storage_unavailable")
        return error_response(503, "the job database is busy or full; retry later", None, "storage_unavailable",
                              {"Retry-After": "10"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = validation_message(exc.errors()[0])
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error; see the server log", None, "internal_error")


def json_body_spec(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body (handlers parse bodies themselves)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
