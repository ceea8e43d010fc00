"""`drivekd judge serve`: the offline grader behind an OpenAI-compatible chat-completions endpoint on 127.0.0.1.

Tests and the demo grade through the real HTTP judge path (client, retries, cache, parsing) with no hosted model.
A request must carry a Drive-KD judge prompt (see :mod:`drivekd.evaluation.rubrics`); the reply lists the points of
each criterion and a "Total Score: N" line computed by :mod:`drivekd.evaluation.offline` — from the structured
ground truth when the server was given the samples file and the sample has it, else with the simple grader from
the prompt's own ground-truth section. A prompt of another protocol (DriveBench's or the DriveLM challenge's own
text, which the grader cannot read) gets a reply in the shape it asks for — "Total Score: N" when the prompt names
that line, else the bare number N — with N a deterministic function of the prompt (:func:`format_check_score`):
a check of the request and parsing path, not a grade. Token counts in ``usage`` are whitespace-separated words.

Robustness: a threading server with a listen backlog of 128 (bursts of 64+ concurrent clients are queued, not
reset), every request answered — malformed ones (not JSON, not an object, ``messages`` not a list of
``{role, content}`` objects, a bad ``Content-Length``) with HTTP 400 and a JSON error, a grader failure with 500 —
and ``GET /health`` for readiness checks. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from drivekd.data.schema import Sample
from drivekd.errors import DriveKDError
from drivekd.evaluation.offline import facts_for, facts_from_text, grade
from drivekd.evaluation.rubrics import format_grade, parse_judge_request

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
DEFAULT_MODEL = "drivekd-offline-grader"
BACKLOG = 128  # pending connections the kernel queues; the default of 5 reset clients in bursts of 32
MAX_BODY = 64 * 1024 * 1024
# A responder turns a chat-completions request body into (HTTP status, reply text or error message).
Responder = Callable[[dict[str, Any]], tuple[int, str]]


def format_check_score(text: str) -> int:
    """0..100 from the SHA-256 of ``text``: what the server answers to a prompt it cannot grade."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 101


def _foreign_reply(messages: list[dict[str, Any]]) -> tuple[int, str]:
    text = "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str))
    if not text.strip():
        return HTTPStatus.BAD_REQUEST, "no prompt text in the messages"
    score = format_check_score(text)
    if "Total Score" in text:
        return (
            HTTPStatus.OK,
            f"Total Score: {score}\nFormat check by the Drive-KD offline server (not a grade).",
        )
    return HTTPStatus.OK, str(score)


def offline_responder(samples: Iterable[Sample] = ()) -> Responder:
    """Grade Drive-KD judge prompts with the offline grader; ``samples`` supply structured ground truth."""
    by_id = {s.id: s for s in samples}

    def respond(body: dict[str, Any]) -> tuple[int, str]:
        messages = body.get("messages") or []
        request = parse_judge_request(messages)
        if request is None:
            return _foreign_reply(messages)
        sample = by_id.get(request.sample_id)
        if sample is not None:
            facts = facts_for(sample, request.prediction)
        else:
            facts = facts_from_text(request.ground_truth, request.prediction)
        result = grade(request.rubric, facts)
        summary = f"Graded by the Drive-KD offline grader ({result.method} ground truth)."
        return HTTPStatus.OK, f"{format_grade(request.rubric, result.points)}\n{summary}"

    return respond


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def body_problem(body: Any) -> str | None:
    """Why ``body`` is not a chat-completions request (``None`` when it is one)."""
    if not isinstance(body, dict):
        return f"the body must be a JSON object, got {type(body).__name__}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{k}] must be an object with a text 'role'"
        if not isinstance(message.get("content"), str | list):
            return f"messages[{k}].content must be text (or a list of content parts)"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # seconds a client may take to send its request (a short body never hangs a thread)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._send(
                HTTPStatus.OK, {"status": "ok", "model": self.server.model, "requests": self.server.requests}
            )
        elif self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.server.model, "object": "model", "created": 0, "owned_by": "drivekd"}
            self._send(HTTPStatus.OK, {"object": "list", "data": [model]})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, "Content-Length must be a byte count up to 64 MiB")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:  # not JSON, or not UTF-8
            self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
            return
        problem = body_problem(body)
        if problem is not None:
            self._error(HTTPStatus.BAD_REQUEST, problem)
            return
        self.server.count()
        try:
            status, text = self.server.responder(body)
        except Exception as err:  # a grader bug answers 500 instead of dropping the connection
            log.exception("the grader failed on a request")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the grader failed: {type(err).__name__}: {err}")
            return
        if status != HTTPStatus.OK:
            self._error(status, text)
            return
        prompt = sum(_words(m.get("content")) for m in body.get("messages") or [])
        self._send(
            HTTPStatus.OK,
            {
                "id": f"chatcmpl-drivekd-{self.server.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.server.model),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": _words(text),
                    "total_tokens": prompt + _words(text),
                },
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, port: int, responder: Responder, model: str) -> None:
        super().__init__((HOST, port), _Handler)
        self.responder = responder
        self.model = model
        self.requests = 0
        self._lock = threading.Lock()

    def count(self) -> None:
        with self._lock:
            self.requests += 1


class JudgeServer:
    """The grading endpoint on 127.0.0.1 (``port=0`` picks a free port). Use as a context manager, or
    :meth:`serve_forever` from the command line."""

    def __init__(self, responder: Responder, *, port: int = 0, model: str = DEFAULT_MODEL) -> None:
        try:
            self._server = _Server(port, responder, model)
        except OverflowError:
            raise DriveKDError(f"--port must be within 0..65535, got {port} (0 picks a free port)") from None
        except OSError as err:
            why = {
                errno.EADDRINUSE: "is in use by another program",
                errno.EACCES: "needs privileges (ports below 1024)",
            }.get(err.errno or 0, f"cannot be opened ({err.strerror})")
            raise DriveKDError(
                f"port {port} on {HOST} {why}: pick another --port, or --port 0 for a free one"
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        """Chat-completion requests received so far."""
        return self._server.requests

    def start(self) -> str:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def serve_forever(self) -> None:
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def __enter__(self) -> JudgeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
