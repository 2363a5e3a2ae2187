"""The HTTP side: FastAPI routes of the OpenAI API (/v1/completions, /v1/chat/completions,
/v1/models) plus /v1/steerings, /health and /metrics (Prometheus), server-sent event streams,
the optional API key, errors in OpenAI's shape, and one access-log line per request (logger
"actsteer.serve"). Generation itself is the engine's (`batcher`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from actsteer.extras import require
from actsteer.methods import get_method
from actsteer.serving.batcher import Engine, Event, Job, Overloaded
from actsteer.serving.decoding import Sampler, TextOutput
from actsteer.serving.metrics import Metrics
from actsteer.serving.protocol import (
    ChatBody,
    Common,
    CompletionBody,
    Limits,
    RequestError,
    check_common,
    resolve_steering,
    stop_strings,
    token_budget,
)
from actsteer.steering import Steering

fastapi = require("fastapi", "serve", "actsteer serve")
from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

#: Seconds an overloaded server asks a client to wait before retrying (Retry-After).
RETRY_AFTER = 1
log = logging.getLogger("actsteer.serve")


def _error(err: RequestError) -> JSONResponse:
    """The error in OpenAI's shape; an overloaded server also says when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER)} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_message(err: RequestValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where or 'body'}: {first.get('msg', 'invalid value')}"


def steering_entry(name: str, steering: Steering) -> dict[str, Any]:
    """How /v1/steerings describes a loaded steering."""
    method = get_method(steering.method)
    supports = sorted(next(iter(steering.maps.values())).bounds) + ["all"]
    return {
        "name": name,
        "method": steering.method,
        "modules": steering.modules,
        "strength_range": list(method.strength_range) if method.strength_range else None,
        "default_strength": steering.info.default_strength,
        "support": steering.default_support,
        "supports": supports,
    }


class Server:
    """One model and its steerings behind the OpenAI API (`app`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        steerings: dict[str, Steering],
        model_name: str,
        api_key: str | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
        max_tokens: int = 1024,
    ) -> None:
        self.tokenizer = tokenizer
        self.steerings = steerings
        self.model_name = model_name
        self.api_key = api_key
        config = getattr(model.config, "text_config", model.config)
        context = config.max_position_embeddings
        if getattr(config, "sliding_window", None):  # the per-row attention has no window
            context = min(context, config.sliding_window)
        self.limits = Limits(context, max_tokens)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = {*eos, tokenizer.eos_token_id} - {None}
        self.engine = Engine(model, steerings, max_batch, max_queue)
        self.metrics = Metrics()
        self.app = self._routes()

    # ---- requests into jobs

    def _job(self, body: Common, prompt: list[int], requested: int | None) -> tuple[Job, Any]:
        check_common(body)
        if body.model != self.model_name:
            raise RequestError(
                f"the model {body.model!r} is not served here; this server serves "
                f"{self.model_name!r}",
                status=404,
                param="model",
            )
        steering = resolve_steering(body, self.steerings)
        budget = token_budget(body, requested, len(prompt), self.limits)
        text = TextOutput(self.tokenizer, budget, stop_strings(body), self.eos_ids)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # no event loop left: the server stopped
                loop.call_soon_threadsafe(queue.put_nowait, event)

        sampler = Sampler(body.temperature, body.top_p, body.seed)
        telemetry = body.actsteer is not None and body.actsteer.telemetry
        job = Job(prompt, sampler, text, emit, steering, telemetry=telemetry)
        try:
            self.engine.submit(job)
        except Overloaded as err:
            raise RequestError(str(err), status=503) from None
        return job, queue

    def completion_prompt(self, body: CompletionBody) -> list[int]:
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError(
                    f"give one prompt per request, got {len(prompt)}", param="prompt"
                )
            prompt = prompt[0]
        ids = list(self.tokenizer.encode(prompt))
        if not ids:
            raise RequestError("the prompt is empty; give some text", param="prompt")
        return ids

    def chat_prompt(self, body: ChatBody) -> list[int]:
        if not body.messages:
            raise RequestError("messages is empty; give at least one message", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "this model's tokenizer has no chat template; use /v1/completions",
                param="messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # the template's own refusal (roles, order)
            raise RequestError(f"the chat template refused the messages: {err}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ---- responses

    async def respond(
        self, body: Common, prompt: list[int], requested: int | None, chat: bool
    ) -> Any:
        job, queue = self._job(body, prompt, requested)
        meta: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if job.steering:  # the λ each steering ran at (a budget's, a default's)
            meta["actsteer"] = {"strengths": {name: lam for name, _, lam, _ in job.steering}}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self._stream(job, queue, meta, chat, usage), media_type="text/event-stream"
            )
        parts, gates, event = [], [], Event()
        try:
            while event.finish_reason is None:
                event = await queue.get()
                if event.error:
                    raise RequestError(event.error, status=503)
                parts.append(event.text)
                gates += event.gates
        finally:
            job.cancelled = True  # no effect once done; frees the row if the client left
        text, reason = "".join(parts), event.finish_reason
        self._counted(job, event)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if job.telemetry:
            choice["actsteer"] = {"gates": gates}
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": self._usage(job, event),
        }

    def _counted(self, job: Job, event: Event) -> None:
        """The finished request in the metrics: its tokens and its steerings."""
        steerings = [name for name, *_ in job.steering]
        self.metrics.generation(len(job.prompt), event.completion_tokens, steerings)

    @staticmethod
    def _usage(job: Job, event: Event) -> dict[str, int]:
        prompt = len(job.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": event.completion_tokens,
            "total_tokens": prompt + event.completion_tokens,
        }

    async def _stream(
        self, job: Job, queue: asyncio.Queue[Event], meta: dict, chat: bool, usage: bool
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(
            text: str | None, reason: str | None, first: bool = False, gates: tuple = ()
        ) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else {}
                choice["delta"] = delta if text is None else {**delta, "content": text}
            else:
                choice["text"] = text or ""
            if job.telemetry and not first:
                choice["actsteer"] = {"gates": list(gates)}
            return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            event = Event()
            while event.finish_reason is None:
                event = await queue.get()
                if event.error:  # an OpenAI-shaped error, then the stream's end
                    error = RequestError(event.error, status=503).body()
                    yield f"data: {json.dumps(error)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield chunk(event.text, event.finish_reason, gates=event.gates)
            self._counted(job, event)
            if usage:
                final = {**meta, "object": kind, "choices": [], "usage": self._usage(job, event)}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away mid-stream: its row leaves the batch

    # ---- the app

    def _routes(self) -> Any:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            await asyncio.to_thread(self.engine.close)

        app = FastAPI(title="actsteer", lifespan=lifespan)

        @app.middleware("http")
        async def account(request: Request, call_next: Any) -> Any:
            """Time every request (a stream to its end), count it, log one line."""
            started = time.perf_counter()
            response = await call_next(request)

            def done() -> None:
                seconds = time.perf_counter() - started
                self.metrics.request(request.url.path, response.status_code, seconds)
                client = request.client.host if request.client else "-"
                log.info(
                    '%s "%s %s" %d %.3f s', client, request.method, request.url.path,
                    response.status_code, seconds,
                )  # fmt: skip

            if isinstance(response, StreamingResponse) and response.status_code == 200:
                body = response.body_iterator

                async def counted() -> AsyncIterator[Any]:
                    try:
                        async for part in body:
                            yield part
                    finally:
                        done()

                response.body_iterator = counted()
            else:
                done()
            return response

        @app.exception_handler(RequestError)
        async def request_error(request: Request, err: RequestError) -> JSONResponse:
            return _error(err)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
            return _error(RequestError(_validation_message(err)))

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, err: HTTPException) -> JSONResponse:
            message = (
                f"no route {request.method} {request.url.path}; this server serves "
                "/v1/completions, /v1/chat/completions, /v1/models, /v1/steerings, /health, "
                "/metrics"
                if err.status_code in (404, 405)
                else str(err.detail)
            )
            return _error(RequestError(message, status=err.status_code))

        async def authorised(request: Request) -> None:
            if self.api_key is None:
                return
            if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
                raise RequestError(
                    "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                    status=401,
                )

        v1 = [Depends(authorised)]

        @app.post("/v1/completions", dependencies=v1)
        async def completions(body: CompletionBody) -> Any:
            return await self.respond(body, self.completion_prompt(body), body.max_tokens, False)

        @app.post("/v1/chat/completions", dependencies=v1)
        async def chat(body: ChatBody) -> Any:
            requested = body.max_completion_tokens
            requested = body.max_tokens if requested is None else requested
            return await self.respond(body, self.chat_prompt(body), requested, True)

        @app.get("/v1/models", dependencies=v1)
        async def models() -> Any:
            entry = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "actsteer"}
            return {"object": "list", "data": [entry]}

        @app.get("/v1/steerings", dependencies=v1)
        async def steerings() -> Any:
            entries = [steering_entry(n, s) for n, s in self.steerings.items()]
            return {"object": "list", "data": entries}

        @app.get("/health")
        async def health() -> Any:
            running, waiting = self.engine.load()
            return {"status": "ok", "running": running, "waiting": waiting}

        @app.get("/metrics")
        async def metrics() -> Any:
            text = self.metrics.render(*self.engine.load())
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return app
