"""The OpenAI-compatible HTTP API: FastAPI routes on the engine queue the page shares.

    api = Api(queue, ApiConfig(model_name="phi-4-multimodal-instruct-q4_k_m"))
    app = api.root_app()      # /v1/..., /health, /metrics     (python -m app.api)
    v1 = api.v1_app()         # just /v1/... to mount beside the web page (launch.py)

Routes: GET /v1/models, POST /v1/chat/completions (plain and streamed), POST /v1/completions;
audio transcription and translation in app/api/audio.py. Every answer holds the engine from
its first to its last token, first come first served with the page (app/engine_queue.py); a
request that would wait behind `max_waiting` others gets 429. Every error is OpenAI's error
object. Streamed answers are server-sent events, framed as llama-cpp-python's server does
(`data: {json}` and a blank line; `data: [DONE]` last); a client that goes away stops its
generation at the next token.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from openai.types import Completion as OpenAICompletion
from openai.types import CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_message_tool_call import ChatCompletionMessageToolCall, Function
from openai.types.completion_usage import PromptTokensDetails
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.agents import Tool
from app.agents.grammar import call_constraint
from app.agents.messages import system_message
from app.agents.reply import Reply, Stopped, model_reply
from app.api.errors import ApiError, error_response
from app.api.messages import MediaPolicy, engine_messages
from app.api.metrics import Metrics
from app.api.schemas import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from app.engine_api import ContextFull, EngineError, PromptError, Sampling, Usage
from app.engine_queue import EngineQueue, QueueFull

RETRY_AFTER_S = 5          # what a client told "queue full" is asked to wait
ARGUMENT_PIECE = 16        # characters of a tool call's arguments per streamed delta


def is_loopback(host: str) -> bool:
    """Whether only this computer can reach an address (a server bound elsewhere should want a key)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 50 * 1024 * 1024
    allow_remote_media: bool = False


class Api:
    """The routes, on one engine queue (None while the model loads: /health says so, the rest 503)."""

    def __init__(self, queue: EngineQueue | None, config: ApiConfig):
        self.config = config
        self.loaded: EngineQueue | None = queue
        self.metrics = Metrics(queue_depth=lambda: self.loaded.waiting if self.loaded else 0)
        self.created = int(time.time())
        self.media = MediaPolicy(allow_remote=config.allow_remote_media, max_bytes=config.max_body_bytes)

    @property
    def queue(self) -> EngineQueue:
        if self.loaded is None:
            raise ApiError("the model is still loading; try again shortly", 503, code="model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.loaded

    # -- apps -----------------------------------------------------------------------------

    def v1_app(self, guarded: bool = True) -> ASGIApp:
        """The OpenAI routes, to be mounted at /v1 (guarded: the API key, the body limit, the counts)."""
        app = self._app()
        app.get("/models")(self.models)
        app.post("/chat/completions")(self.chat_completions)
        app.post("/completions")(self.completions)
        from app.api.audio import add_audio_routes

        add_audio_routes(app, self)
        return _Guard(app, self) if guarded else app

    def root_app(self) -> ASGIApp:
        """/v1 and the server's own /health and /metrics, all behind one guard."""
        app = self._app()
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics_text)
        app.mount("/v1", self.v1_app(guarded=False))
        return _Guard(app, self)

    def _app(self) -> FastAPI:
        app = FastAPI(title="phi4mm-local OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
        app.exception_handler(ApiError)(lambda request, e: e.response())
        app.exception_handler(RequestValidationError)(self._invalid)
        app.exception_handler(StarletteHTTPException)(self._http_error)
        return app

    @staticmethod
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(f"{where or 'request'}: {first.get('msg', 'invalid request')}", 400, param=where or None)

    @staticmethod
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(message, 404 if e.status_code == 405 else e.status_code)

    # -- small routes ---------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if self.loaded is None:
            return JSONResponse({"status": "loading", "model": self.config.model_name}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.config.model_name})

    async def metrics_text(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict[str, Any]:
        model = Model(id=self.config.model_name, created=self.created, object="model", owned_by="phi4mm-local",
                      context_length=self.queue.n_ctx, modalities=["text", *sorted(self.queue.modalities)])
        return {"object": "list", "data": [model.model_dump()]}

    def _check_model(self, name: str | None) -> None:
        if name and name != self.config.model_name:
            raise ApiError(f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           404, param="model", code="model_not_found")

    # -- chat completions -----------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        _check_common(body)
        messages = engine_messages(body.messages, self.media, self.queue.modalities)
        tools, constraint, call_first = _tools(body, self.queue.constraints)
        if tools:
            messages = _declare(messages, list(tools.values()))
        if body.response_format is not None and body.response_format.type != "text" and tools:
            raise ApiError("response_format and tools cannot be used together here", param="response_format")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.queue.n_ctx
        sampling = _sampling(body, max_tokens, _response_schema(body))

        def produce(cancel: threading.Event, emit: Callable[[str, Any], None]) -> None:
            replies = model_reply(self.queue.engine, messages, sampling, tools, constraint=constraint,
                                  call_first=call_first, cancel=cancel)
            while True:
                try:
                    emit("text", next(replies).text)
                except StopIteration as done:
                    emit("reply", done.value)
                    return

        run = Run(self, produce, request)
        first = await run.start()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            text, reply = await run.collect(first)
            return JSONResponse(self._chat_response(ident, created, text, reply).model_dump(exclude_none=True))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(self._chat_chunks(run, first, ident, created, include_usage), run)

    def _chat_response(self, ident: str, created: int, text: str, reply: Reply) -> ChatCompletion:
        self._observe(reply.usage)
        calls = [ChatCompletionMessageToolCall(id=c.id, type="function",
                                               function=Function(name=c.name, arguments=json.dumps(c.arguments)))
                 for c in reply.calls]
        content = reply.text if reply.calls else text
        message = ChatCompletionMessage(role="assistant", content=content or (None if calls else ""),
                                        tool_calls=calls or None)
        return ChatCompletion(id=ident, object="chat.completion", created=created, model=self.config.model_name,
                              choices=[Choice(index=0, message=message, finish_reason=_finish_reason(reply))],
                              usage=_usage(reply.usage), timings=_timings(reply.usage))

    async def _chat_chunks(self, run: "Run", first: tuple[str, Any], ident: str, created: int,
                           include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: ChoiceDelta, finish_reason: str | None = None) -> str:
            return _frame(ChatCompletionChunk(id=ident, object="chat.completion.chunk", created=created,
                                              model=self.config.model_name,
                                              choices=[ChunkChoice(index=0, delta=delta,
                                                                   finish_reason=finish_reason)]))

        yield chunk(ChoiceDelta(role="assistant", content=""))
        text_frame = _TextFrames(ChatCompletionChunk(
            id=ident, object="chat.completion.chunk", created=created, model=self.config.model_name,
            choices=[ChunkChoice(index=0, delta=ChoiceDelta(content=""))]), ("choices", 0, "delta"), "content")
        async for kind, value in run.events(first):
            if kind == "text":
                yield text_frame(value)
                continue
            reply: Reply = value
            for index, call in enumerate(reply.calls):
                arguments = json.dumps(call.arguments)
                yield chunk(ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                    index=index, id=call.id, type="function",
                    function=ChoiceDeltaToolCallFunction(name=call.name, arguments=""))]))
                for start in range(0, len(arguments), ARGUMENT_PIECE):
                    yield chunk(ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                        index=index, function=ChoiceDeltaToolCallFunction(
                            arguments=arguments[start:start + ARGUMENT_PIECE]))]))
            if reply.unreadable:
                yield chunk(ChoiceDelta(content=reply.call_text))
            yield chunk(ChoiceDelta(), _finish_reason(reply))
            self._observe(reply.usage)
            if include_usage:
                yield _frame(ChatCompletionChunk(id=ident, object="chat.completion.chunk", created=created,
                                                 model=self.config.model_name, choices=[],
                                                 usage=_usage(reply.usage), timings=_timings(reply.usage)))
        yield "data: [DONE]\n\n"

    # -- completions (a raw prompt) -------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        _check_common(body)
        if body.echo or body.suffix:
            raise ApiError("echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError("prompt must be one non-empty string", param="prompt")
        sampling = _sampling(body, body.max_tokens, None)

        def produce(cancel: threading.Event, emit: Callable[[str, Any], None]) -> None:
            for piece in self.queue.engine.stream(prompts[0], sampling):
                if cancel.is_set():
                    raise Stopped("")
                if piece.usage is not None:
                    emit("reply", Reply("", finish_reason=piece.finish_reason or "stop", usage=piece.usage))
                elif piece.text:
                    emit("text", piece.text)

        run = Run(self, produce, request)
        first = await run.start()
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def response(text: str, reply: Reply | None, with_usage: bool) -> OpenAICompletion:
            # A streamed piece has no finish reason yet, which the openai type does not allow: built unchecked.
            choices = [CompletionChoice(index=0, text=text, finish_reason=_finish_reason(reply)) if reply
                       else CompletionChoice.model_construct(index=0, text=text, finish_reason=None, logprobs=None)]
            usage = reply.usage if reply else None
            return OpenAICompletion(id=ident, object="text_completion", created=created, model=self.config.model_name,
                                    choices=choices if not (with_usage and reply is None) else [],
                                    usage=_usage(usage) if with_usage and usage else None)

        if not body.stream:
            text, reply = await run.collect(first)
            self._observe(reply.usage)
            return JSONResponse(response(text, reply, True).model_dump(exclude_none=True))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        text_frame = _TextFrames(response("", None, False), ("choices", 0), "text")

        async def frames() -> AsyncIterator[str]:
            async for kind, value in run.events(first):
                if kind == "text":
                    yield text_frame(value)
                else:
                    self._observe(value.usage)
                    yield _frame(response("", value, False))
                    if include_usage:
                        final = response("", value, True)
                        final.choices = []
                        yield _frame(final)
            yield "data: [DONE]\n\n"

        return _sse(frames(), run)

    def _observe(self, usage: Usage | None) -> None:
        if usage is not None:
            self.metrics.generation(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                                    usage.ttft_ms / 1000, usage.decode_tokens_per_s)


# -- every request: the key, the body's size, the counts ---------------------------------------

class _Guard:
    """ASGI middleware in front of the routes: `Authorization: Bearer KEY` when the API has a key
    (compared in constant time), the body limit (the body is read whole first: a chunked upload
    has no Content-Length to check), and the request counter of /metrics."""

    def __init__(self, app: ASGIApp, api: Api):
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("root_path", "") + scope["path"]
        status = [500]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            body = None if refusal is not None else await self._body(receive)
            if refusal is None and body is None:
                refusal = self._too_large()
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            self.api.metrics.request(route, status[0])

    def _refusal(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.api.config.api_key
        if key is not None and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                       f"Bearer {key}".encode()):
            return error_response("missing or wrong API key (Authorization: Bearer KEY)", 401, code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.api.config.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> Response:
        return error_response(f"the request body is over {self.api.config.max_body_bytes // 2**20} MB", 413,
                              code="request_too_large")

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, or None past the limit."""
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees what came
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.api.config.max_body_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body read already, then listens to the client again
    (for its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# -- one generation, run in a thread of its own ------------------------------------------------

class Run:
    """A generation on the engine queue, in a worker thread, its events handed to the event loop.

    `start()` takes the place in line (429 at once when the queue is full) and waits for the
    first event, so that a refused prompt (400, context too long) is still a plain error
    response, not a broken stream. A client that goes away, while it waits in line or while its
    answer is written, streamed or not, cancels the run: the generation stops at its next token
    and the place in line is given up.
    """

    def __init__(self, api: Api, produce: Callable[[threading.Event, Callable[[str, Any], None]], None],
                 request: Request):
        self.api, self.produce, self.request = api, produce, request
        self.cancelled = threading.Event()
        self._events: asyncio.Queue = asyncio.Queue()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> tuple[str, Any]:
        try:
            ticket = self.api.queue.join()
        except QueueFull as e:
            raise ApiError(str(e), 429, code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        loop = asyncio.get_running_loop()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

        def work() -> None:
            try:
                ticket.wait(self.cancelled)
                self.produce(self.cancelled, emit)
            except Stopped:
                emit("stopped", None)
            except BaseException as e:  # handed to the event loop, answered there
                emit("error", e)
            finally:
                ticket.leave()
                emit("end", None)

        self._watcher = asyncio.create_task(self._watch_client())
        threading.Thread(target=work, name="api-generation", daemon=True).start()
        try:
            first = await self._events.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if first[0] == "error":
            self.cancel()
            raise _as_api_error(first[1])
        return first

    async def _watch_client(self) -> None:
        """Cancel the run when the client disconnects (its request body is read by then)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.cancelled.set()

    def cancel(self) -> None:
        """Stop the generation (at its next token) and the watching; safe to call twice."""
        self.cancelled.set()
        if self._watcher is not None:
            self._watcher.cancel()

    async def events(self, first: tuple[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        """The text pieces and the final reply; ends after the reply (or quietly when stopped)."""
        event = first
        try:
            while True:
                kind, value = event
                if kind in ("text", "reply"):
                    yield event
                if kind in ("reply", "stopped", "end"):
                    return
                if kind == "error":
                    raise _as_api_error(value)
                event = await self._events.get()
        finally:
            self.cancel()

    async def collect(self, first: tuple[str, Any]) -> tuple[str, Reply]:
        text, reply = [], None
        async for kind, value in self.events(first):
            if kind == "text":
                text.append(value)
            else:
                reply = value
        if reply is None:
            raise ApiError("the generation was stopped", 500)
        return "".join(text), reply


class _RunResponse(StreamingResponse):
    """Server-sent events of a Run, which is cancelled however the response ends (Starlette
    cancels a stream whose client went away without finishing our generator)."""

    def __init__(self, run: Run, frames: AsyncIterator[str]):
        super().__init__(frames, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


def _sse(frames: AsyncIterator[str], run: Run) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for frame in frames:
                yield frame
        except Exception as e:  # after the first event the stream is open: the error is a frame
            error = _as_api_error(e)
            yield _frame_dict({"error": {"message": error.message, "type": "server_error", "param": error.param,
                                         "code": error.code}})

    return _RunResponse(run, guarded())


def _frame(model: Any) -> str:
    return _frame_dict(model.model_dump(exclude_none=True))


def _frame_dict(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _TextFrames:
    """The frames of a stream's text pieces, one per token: the chunk is built and checked as
    its openai type once, then only its text changes. (Building the pydantic object for every
    token was a fifth of the event loop's time, taken from the llama.cpp threads on a small machine.)"""

    def __init__(self, chunk: Any, at: tuple[str | int, ...], key: str):
        self.data = chunk.model_dump(exclude_none=True)
        self.holder = self.data
        for step in at:
            self.holder = self.holder[step]
        self.key = key

    def __call__(self, text: str) -> str:
        self.holder[self.key] = text
        return _frame_dict(self.data)


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextFull):
        return ApiError(str(e), 400, param="messages", code="context_length_exceeded")
    if isinstance(e, (PromptError, ValueError)):
        return ApiError(str(e), 400)
    if isinstance(e, EngineError):
        return ApiError(str(e), 400)
    return ApiError(f"the model failed: {type(e).__name__}: {e}", 500)


# -- request -> engine options -----------------------------------------------------------------

def _check_common(body: Any) -> None:
    if body.n != 1:
        raise ApiError(f"n={body.n} is not supported: this server generates one choice per request", param="n")
    if body.logprobs:
        raise ApiError("logprobs are not supported", param="logprobs")


def _sampling(body: Any, max_tokens: int, json_schema: dict[str, Any] | None) -> Sampling:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise ApiError("stop strings must not be empty", param="stop")
    grammar = getattr(body, "grammar", None)
    if grammar is not None and json_schema is not None:
        raise ApiError("grammar and response_format cannot be used together", param="grammar")
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    seed=body.seed, stop=tuple(stop), grammar=grammar, json_schema=json_schema)


def _response_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema response_format asks for (an engine enforces it: a grammar on llama.cpp)."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError("response_format json_schema needs json_schema.schema", param="response_format.json_schema")
    return fmt.json_schema.schema_


def _tools(body: ChatCompletionRequest, constraints: frozenset[str]) -> tuple[dict[str, Tool], dict | None, bool]:
    """The tools the model is told of, the constraint of its calls, and whether it must call at once."""
    choice = body.tool_choice or "auto"
    if not body.tools or choice == "none":
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise ApiError("tool_choice asks for a tool call but no tools are given", param="tool_choice")
        return {}, None, False
    tools: dict[str, Tool] = {}
    for i, spec in enumerate(body.tools):
        try:
            tool = Tool.from_openai(spec.model_dump(), None)
        except (ValueError, TypeError) as e:
            raise ApiError(f"tools[{i}]: {e}", param=f"tools[{i}]") from None
        if tool.name in tools:
            raise ApiError(f"two tools are named {tool.name!r}", param=f"tools[{i}]")
        tools[tool.name] = tool
    called = list(tools.values())
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in tools:
            raise ApiError(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        called = [tools[choice.function.name]]
    try:
        constraint = call_constraint(constraints, called)
    except Exception as e:
        raise ApiError(f"tools: a parameters schema cannot be enforced: {e}", param="tools") from None
    return tools, constraint, choice == "required" or isinstance(choice, NamedToolChoice)


def _declare(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools declared in the system message, in Phi-4-mini's format (the client's system
    prompt kept; the model's default one where there is none)."""
    system = None
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        system, messages = messages[0]["content"], messages[1:]
    return [system_message(system, tools), *messages]


def _finish_reason(reply: Reply | None) -> str:
    if reply is None:
        return "stop"
    if reply.calls:
        return "tool_calls"
    return "length" if reply.finish_reason in ("length", "context") else "stop"


def _usage(usage: Usage | None) -> CompletionUsage | None:
    if usage is None:
        return None
    return CompletionUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                           total_tokens=usage.prompt_tokens + usage.completion_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens))


def _timings(usage: Usage | None) -> dict[str, Any] | None:
    """Our own figures, as llama-server adds them: where the time went, and the LoRA."""
    if usage is None:
        return None
    return {"adapter": usage.adapter, "encoder_ms": round(usage.encoder_ms, 3),
            "prompt_n": usage.prompt_tokens - usage.cached_tokens, "prompt_ms": round(usage.prefill_ms, 3),
            "prompt_per_second": round(usage.prefill_tokens_per_s, 3), "predicted_n": usage.completion_tokens,
            "predicted_ms": round(usage.decode_ms, 3), "predicted_per_second": round(usage.decode_tokens_per_s, 3),
            "ttft_ms": round(usage.ttft_ms, 3), "cache_n": usage.cached_tokens}
