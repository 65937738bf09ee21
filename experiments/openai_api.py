"""An OpenAI-compatible HTTP layer (starlette) over ``deepseek_jax.infer.engine.Engine``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text). The engine steps in its own thread
(``EngineThread``); each HTTP request waits on an asyncio queue that the engine's token
callback feeds. A request whose client goes away is cancelled, which frees its pages at
the next step. Bad input gets a 4xx JSON error whose ``param`` names the field; when
``max_queue`` requests already wait for cache pages, a new one gets 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from deepseek_jax.infer.engine import Engine
from deepseek_jax.infer.sampling import SamplingParams

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "n", "user"}
COMMON |= {"stop", "stop_token_ids", "stream_options"}
FIELDS = {"completions": COMMON | {"prompt"}, "chat": COMMON | {"messages"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class EngineThread:
    """Runs ``engine.step()`` in a daemon thread until ``stop()``."""

    def __init__(self, engine: Engine):
        self.engine, self._stop = engine, threading.Event()
        self.error: BaseException | None = None
        self._go = threading.Event()
        self._go.set()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            if not self._go.is_set():
                self._go.wait(0.05)
                continue
            try:
                busy = eng.step()
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                traceback.print_exc()
                self.error = e
                eng.abort_all("error")
                continue
            if not busy:
                eng.wake.wait(0.05)
                eng.wake.clear()

    def pause(self) -> None:
        """Holds the engine at a step boundary (requests queue meanwhile) until resume()."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wake.set()
        self._thread.join(timeout=10)


@dataclass
class Served:
    engine: Engine
    name: str
    tokenizer: object | None = None  # .encode(str) / .decode(ids); None: token ids only
    chat_template: str | None = None
    max_queue: int = 64
    started: float = 0.0


def _number(body, key, default, kind, ok, why):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, kind):
        raise APIError(400, f"{key} must be a {kind.__name__ if kind is int else 'number'}", key)
    if not ok(v):
        raise APIError(400, f"{key} {why}, got {v}", key)
    return v


def sampling_params(body: dict) -> SamplingParams:
    """SamplingParams from an OpenAI request body (``top_k``, ``stop_token_ids``: vLLM's
    extensions); 400 naming the field on a bad value."""
    if body.get("n", 1) != 1:
        raise APIError(400, "n: only n = 1 is served", "n")
    if body.get("stop"):
        raise APIError(400, "stop: stop strings are not served; use stop_token_ids", "stop")
    stops = body.get("stop_token_ids") or []
    if not isinstance(stops, list) or not all(isinstance(t, int) for t in stops):
        raise APIError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
    num = (int, float)
    return SamplingParams(
        max_tokens=_number(body, "max_tokens", 16, int, lambda v: v >= 1, "must be >= 1"),
        temperature=float(_number(body, "temperature", 1.0, num, lambda v: v >= 0, "must be >= 0")),
        top_p=float(_number(body, "top_p", 1.0, num, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        top_k=_number(body, "top_k", 0, int, lambda v: v >= 0, "must be >= 0"),
        seed=_number(body, "seed", 0, int, lambda v: 0 <= v < 2**31, "must be in [0, 2^31)"),
        stop_token_ids=tuple(stops),
    )


def _encode(served: Served, text: str, param: str) -> list[int]:
    if served.tokenizer is None:
        raise APIError(
            400, f"{param}: this model has no tokenizer; send the prompt as token ids", param
        )
    return list(served.tokenizer.encode(text))


def prompt_ids(served: Served, body: dict, kind: str) -> list[int]:
    if kind == "chat":
        msgs = body.get("messages")
        ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)
        if not ok or not all(isinstance(m.get("content"), str) for m in msgs):
            raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
        return _encode(served, render_chat(msgs, served.chat_template), "messages")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return _encode(served, p, "prompt")
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise APIError(400, "prompt must be a string or a non-empty list of token ids", "prompt")


def render_chat(messages: list[dict], template: str | None) -> str:
    """The tokenizer's chat template (jinja) where there is one, else "role: content" lines
    and an open assistant turn."""
    if template:
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
        )
    lines = [f"{m.get('role', 'user')}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


async def _read_body(request: HTTPRequest, kind: str) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"body: malformed JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", "body")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0])
    return body


class _Detok:
    """Incremental text: decode everything, emit what is new (holding back a trailing
    partial UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, ids: list[int]) -> str:
        if self.tok is None:
            return ""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def build_app(served: Served) -> Starlette:
    eng = served.engine
    served.started = time.time()
    counters = {"requests": 0, "errors": 0, "rejected_503": 0, "disconnects": 0}

    async def handle(request: HTTPRequest, kind: str) -> Response:
        counters["requests"] += 1
        try:
            body = await _read_body(request, kind)
            if body.get("model", served.name) != served.name:
                raise APIError(404, f"model: {body['model']!r} is not served", "model")
            params = sampling_params(body)
            ids = prompt_ids(served, body, kind)
            if eng.queue_depth >= served.max_queue:
                counters["rejected_503"] += 1
                raise APIError(503, "the cache is full and the queue is long; retry", None)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()

            def cb(r, toks, fin):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (toks, fin))
                except RuntimeError:  # the event loop has closed (server shutdown)
                    pass

            try:
                req = eng.submit(ids, params, cb)
            except ValueError as e:
                param = str(e).split(" ")[0].strip(":")
                raise APIError(400, str(e), param if param in body else "prompt") from None
        except APIError as e:
            counters["errors"] += 1
            return e.response()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        if body.get("stream"):
            return StreamingResponse(
                _stream(request, req, queue, rid, kind), media_type="text/event-stream"
            )
        return await _whole(request, req, queue, rid, kind, len(ids))

    def _chunk(rid, kind, text, toks, fin):
        if kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": fin}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "token_ids": toks, "finish_reason": fin}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": served.name,
                "choices": [choice]}  # fmt: skip

    async def _next(request, req, queue):
        """The next (tokens, finish) update; cancels the request if the client is gone."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    counters["disconnects"] += 1
                    eng.cancel(req)
                    return None

    async def _stream(request, req, queue, rid, kind):
        detok = _Detok(served.tokenizer)
        try:
            while True:
                update = await _next(request, req, queue)
                if update is None:
                    return
                toks, fin = update
                yield f"data: {json.dumps(_chunk(rid, kind, detok.push(toks), toks, fin))}\n\n"
                if fin is not None:
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away mid-stream (the generator was closed)
            if not req.done:
                counters["disconnects"] += 1
                eng.cancel(req)

    async def _whole(request, req, queue, rid, kind, n_prompt):
        while True:
            update = await _next(request, req, queue)
            if update is None:
                return Response(status_code=499)
            if update[1] is not None:
                break
        text = served.tokenizer.decode(req.output) if served.tokenizer is not None else ""
        if kind == "chat":
            msg = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": msg, "finish_reason": req.finish_reason}
        else:
            choice = {"index": 0, "text": text, "token_ids": req.output,
                      "finish_reason": req.finish_reason}  # fmt: skip
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(req.output),
                 "total_tokens": n_prompt + len(req.output)}  # fmt: skip
        obj = "chat.completion" if kind == "chat" else "text_completion"
        out = {"id": rid, "object": obj, "created": int(time.time()), "model": served.name}
        return JSONResponse({**out, "choices": [choice], "usage": usage})

    async def completions(request):
        return await handle(request, "completions")

    async def chat(request):
        return await handle(request, "chat")

    async def models(request):
        card = {"id": served.name, "object": "model", "owned_by": "deepseek-jax"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": served.name})

    async def metrics(request):
        s, a = eng.stats, eng.alloc
        rows = [
            ("requests_total", "counter", counters["requests"]),
            ("request_errors_total", "counter", counters["errors"]),
            ("requests_rejected_busy_total", "counter", counters["rejected_503"]),
            ("client_disconnects_total", "counter", counters["disconnects"]),
            ("generated_tokens_total", "counter", s["generated_tokens"]),
            ("prompt_tokens_total", "counter", s["prefill_tokens"]),
            ("decode_steps_total", "counter", s["decode_steps"]),
            ("mtp_drafted_total", "counter", s["drafted"]),
            ("mtp_accepted_total", "counter", s["accepted"]),
            ("queue_depth", "gauge", eng.queue_depth),
            ("running_requests", "gauge", eng.active),
            ("cache_pages_in_use", "gauge", a.in_use),
            ("cache_pages_total", "gauge", a.capacity),
        ]
        text = "".join(f"# TYPE deepseek_jax_{n} {t}\ndeepseek_jax_{n} {v}\n" for n, t, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def not_found(request, exc):
        return APIError(404, f"{request.url.path}: no such endpoint", None).response()

    async def bad_method(request, exc):
        return APIError(405, f"{request.method} {request.url.path}: method not allowed").response()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
