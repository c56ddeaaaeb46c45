"""A small, real OpenAI-compatible judge server with deterministic answers (tests, demos, debug).

It serves ``POST /v1/chat/completions`` on loopback. The answer for a prompt is derived from
a hash of the prompt text (repeat seeds flip about one judgement in ten, so agreement runs
are not trivially perfect); it has one score per criterion of either judge protocol's prompt.
It keeps the last request bodies, counts every answered request per request-content hash, can
reject request options with 400, answer 413 above a body size, hold requests beyond a number
of answers (to kill a client mid-run), and play a script of faults: ``"429"``, ``"500"``,
``"short"`` (one score too few), ``"garbage"`` (no JSON).

Run it standalone with ``python -m evaluation.fake_judge --port 8011``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import click
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

_COUNT_RE = re.compile(r"Evaluation Criteria \((\d+)\)")
_CRITERION_RE = re.compile(r"^\d+\. \[(?:Positive|Penalty) Point\] ", re.M)


@dataclass
class FakeJudgeState:
    """Behaviour switches and counters of the fake judge."""

    faults: deque[str] = field(default_factory=deque)
    """Faults to play, one per request, before answering normally."""
    reject_params: set[str] = field(default_factory=set)
    """Request options answered with 400 naming the option (e.g. ``response_format``)."""
    max_body_bytes: int | None = None
    """Answer 413 to larger request bodies."""
    max_answers: int | None = None
    """After this many answers, hold further requests until :attr:`release` is set, then 503."""
    delay_s: float = 0.0
    """Delay before each answer."""
    models: set[str] | None = None
    """Model names served (None: any); others get 404."""
    reserved: int = 0
    """Requests admitted and not yet answered."""
    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))
    """The last 64 chat request bodies received (parsed JSON, refused ones included), oldest first."""
    answered: Counter[str] = field(default_factory=Counter)
    """Answered (200) requests per hash of the request's messages."""
    status_counts: Counter[int] = field(default_factory=Counter)
    """Responses per HTTP status."""
    release: threading.Event = field(default_factory=threading.Event)
    """Set to let held requests go (they get 503 and are not counted as answered)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards the counters."""

    @property
    def total_answered(self) -> int:
        """Requests answered with 200."""
        return sum(self.answered.values())

    @property
    def duplicates(self) -> int:
        """Answered requests beyond the first for the same content."""
        return sum(n - 1 for n in self.answered.values() if n > 1)


def _bits(text: str, n: int, salt: str) -> list[int]:
    digest = hashlib.sha256((salt + text).encode()).digest()
    return [digest[k] & 1 for k in range(n)]


def fake_answer(prompt: str, seed: int | None) -> dict[str, Any]:
    """The deterministic answer to a judge prompt.

    It has as many scores as the prompt's "Evaluation Criteria (n)" heading says (``ours``), else
    as it lists numbered "[Positive Point]"/"[Penalty Point]" lines (``upstream``), else 5 (an
    upstream prompt for a ``d11..d55`` block lists none).
    """
    match = _COUNT_RE.search(prompt)
    n = int(match.group(1)) if match else len(_CRITERION_RE.findall(prompt)) or 5
    scores = _bits(prompt, n, "scores")
    if seed:
        flips = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
        scores = [s ^ (flips[k] < 26) for k, s in enumerate(scores)]
    return {
        "scores": scores,
        "reasons": [
            f"criterion {k + 1} {'met' if s else 'not met'} in the sampled frames" for k, s in enumerate(scores)
        ],
        "reasoning": "deterministic fake judgement",
    }


def create_app(state: FakeJudgeState) -> FastAPI:
    """The FastAPI app of the fake judge."""
    app = FastAPI(title="fake MicroWorldBench judge")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-judge", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.body()
        data = json.loads(body)
        with state.lock:
            state.bodies.append(data)

        def reply(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
            with state.lock:
                state.status_counts[status] += 1
            return JSONResponse(payload, status_code=status, headers=headers)

        if state.max_body_bytes is not None and len(body) > state.max_body_bytes:
            return reply(413, {"error": {"message": "request entity too large", "type": "invalid_request_error"}})
        if state.models is not None and data.get("model") not in state.models:
            return reply(
                404, {"error": {"message": f"model {data.get('model')!r} does not exist", "type": "not_found"}}
            )
        for param in state.reject_params:
            if param in data:
                return reply(
                    400,
                    {
                        "error": {
                            "message": f"Unsupported parameter: '{param}'",
                            "type": "invalid_request_error",
                            "param": param,
                        }
                    },
                )
        with state.lock:
            fault = state.faults.popleft() if state.faults else None
            held = state.max_answers is not None and state.total_answered + state.reserved >= state.max_answers
            if not held and fault not in ("429", "500"):
                state.reserved += 1  # this request will be answered: count it against max_answers now
        if held:
            while not state.release.is_set():
                await asyncio.sleep(0.05)
            return reply(503, {"error": {"message": "server stopped answering"}})
        if fault == "429":
            return reply(429, {"error": {"message": "rate limited"}}, {"retry-after-ms": "10"})
        if fault == "500":
            return reply(500, {"error": {"message": "internal error"}}, {"retry-after-ms": "10"})
        messages = data.get("messages", [])
        first = messages[0]["content"] if messages else ""
        prompt = (
            next((p["text"] for p in first if p.get("type") == "text"), "") if isinstance(first, list) else str(first)
        )
        answer = fake_answer(prompt, data.get("seed"))
        if fault == "short":
            answer["scores"] = answer["scores"][:-1]
        content = "I cannot judge this." if fault == "garbage" else json.dumps(answer)
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        with state.lock:
            state.answered[key] += 1
            state.reserved -= 1
        n_images = (
            sum(1 for p in first if isinstance(p, dict) and p.get("type") == "image_url")
            if isinstance(first, list)
            else 0
        )
        usage = {"prompt_tokens": len(prompt) // 4 + 85 * n_images, "completion_tokens": len(content) // 4}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return reply(
            200,
            {
                "id": f"chatcmpl-{key[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": data.get("model", "fake-judge"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": usage,
            },
        )

    return app


class FakeJudgeServer:
    """Runs the fake judge with uvicorn in a background thread on 127.0.0.1."""

    def __init__(self, port: int = 0, state: FakeJudgeState | None = None) -> None:
        self.state = state or FakeJudgeState()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(create_app(self.state), log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        """OpenAI base URL (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeJudgeServer:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake judge server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving (held requests are released first)."""
        self.state.release.set()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@click.command()
@click.option("--port", type=int, default=8011, show_default=True, help="Port on 127.0.0.1.")
@click.option("--delay", type=float, default=0.0, help="Seconds before each answer.")
def main(port: int, delay: float) -> None:
    """Serve the fake judge until interrupted."""
    logging.basicConfig(level=logging.INFO)
    server = FakeJudgeServer(port, FakeJudgeState(delay_s=delay)).start()
    click.echo(f"fake judge at {server.base_url}  (model name: any)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
