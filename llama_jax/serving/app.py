"""The OpenAI-compatible HTTP API over a BatchingEngine, on FastAPI:

    POST /v1/completions, POST /v1/chat/completions (both with "stream": server-sent events ending [DONE]),
    GET /v1/models, GET /health (the engine's slots, queue and counters)

Every error is an OpenAI error object with a 4xx/5xx status; the engine runs on its own thread, and each HTTP
request's engine requests report back to it through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_jax.chat import encode_chat
from llama_jax.inference.batching import BatchingEngine, QueueFull
from llama_jax.inference.requests import Request as EngineRequest, RequestError, RequestParams, Update
from llama_jax.sampling import SamplingError
from llama_jax.serving import formats as fmt
from llama_jax.serving.protocol import ApiError, ChatBody, CompletionBody, parse

log = logging.getLogger(__name__)


class Choices:
    """The engine requests of one HTTP request (its prompts times n), whose updates arrive on one asyncio queue.
    Leaving `updates()` early (the client went away) cancels whatever is still running."""

    def __init__(self, server: "Server", prompts: list[list[int]], params: list[RequestParams], param: str):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.requests: list[EngineRequest] = []
        self.prompts = prompts

        def deliver(i: int, update: Update) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is listening any more
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, update))

        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                r = EngineRequest(prompt, p, lambda u, i=i: deliver(i, u), server.tokenizer, server.stop_ids)
                server.engine.submit(r)
                self.requests.append(r)
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except RequestError as e:
            self.cancel()
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            raise ApiError(400, str(e), param=param, code=code) from None

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def updates(self) -> AsyncIterator[tuple[int, Update]]:
        pending = len(self.requests)
        try:
            while pending:
                i, update = await self.queue.get()
                pending -= update.final
                yield i, update
        finally:
            self.cancel()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Server:
    def __init__(self, engine: BatchingEngine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.context = engine.config.max_seq_len

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def body(self, request: Request, model: type) -> Any:
        self.authorize(request)
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        body = parse(model, data)
        if body.model is not None and body.model != self.model_name:
            raise ApiError(400, f"unknown model {body.model!r}; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def params(self, body, count: int, **kw: Any) -> list[RequestParams]:
        """Each choice's settings; with a seed, choice j of a prompt draws with seed + j."""
        try:
            return [RequestParams(temperature=body.temperature if body.temperature is not None else 1.0,
                                  top_p=body.top_p if body.top_p is not None else 1.0, top_k=body.top_k or 0,
                                  seed=None if body.seed is None else body.seed + j % body.n,
                                  stop=body.stop_strings, **kw) for j in range(count)]
        except (RequestError, SamplingError) as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    def prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        """Token-id lists and texts of the completions API's prompt forms (str, [str], [int], [[int]])."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
        ids = [self.tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else p for p in prompt]
        return ids, [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompt]

    # -- /v1/completions

    async def completions(self, request: Request):
        body: CompletionBody = await self.body(request, CompletionBody)
        ids, texts = self.prompts(body.prompt)
        ids = [p for p in ids for _ in range(body.n)]
        texts = [t for t in texts for _ in range(body.n)]
        params = self.params(body, len(ids), max_tokens=body.max_tokens or 16, logprobs=body.logprobs,
                             prompt_logprobs=body.echo and body.logprobs is not None)
        choices = Choices(self, ids, params, "prompt")
        rid = fmt.new_id("cmpl")
        logprobs = [fmt.CompletionLogprobs(self.tokenizer, 0 if body.echo else len(t)) for t in texts]
        started = [False] * len(ids)

        def piece(i: int, u: Update) -> tuple[str, dict | None]:
            text, lp = u.text, None
            if body.logprobs is not None:
                lp = logprobs[i].add([*(u.prompt_logprobs or []), *u.logprobs],
                                     [*(ids[i] if u.prompt_logprobs is not None else []), *u.tokens])
            if body.echo and not started[i]:
                text = texts[i] + text
            started[i] = True
            return text, lp

        if body.stream:
            return self._stream(choices, ids, "text_completion", rid, body.include_usage,
                                lambda i, u: fmt.completion_choice(i, *piece(i, u), u.finish_reason))

        parts, last = await self._collect(choices, piece)
        out = [fmt.completion_choice(i, "".join(t for t, _ in parts[i]),
                                     fmt.merge_logprobs([lp for _, lp in parts[i] if lp is not None]),
                                     last[i].finish_reason) for i in range(len(ids))]
        return fmt.envelope("text_completion", self.model_name, rid, out, self._usage(ids, last))

    # -- /v1/chat/completions

    async def chat(self, request: Request):
        body: ChatBody = await self.body(request, ChatBody)
        try:
            prompt = encode_chat(self.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.context - len(prompt))
        top = (body.top_logprobs or 0) if body.logprobs else None
        ids = [prompt] * body.n
        choices = Choices(self, ids, self.params(body, body.n, max_tokens=max_tokens, logprobs=top), "messages")
        rid = fmt.new_id("chatcmpl")

        def piece(i: int, u: Update) -> tuple[str, dict | None]:
            return u.text, fmt.chat_logprobs(self.tokenizer, u.logprobs) if top is not None else None

        if body.stream:
            started: set[int] = set()

            def chunk(i: int, u: Update) -> dict:
                first = i not in started
                started.add(i)
                return fmt.chat_choice(i, *piece(i, u), u.finish_reason, delta=True, first=first)

            return self._stream(choices, ids, "chat.completion.chunk", rid, body.include_usage, chunk)

        parts, last = await self._collect(choices, piece)
        out = []
        for i in range(body.n):
            content = [lp["content"] for _, lp in parts[i] if lp is not None]
            lp = {"content": [c for cs in content for c in cs]} if top is not None else None
            out.append(fmt.chat_choice(i, "".join(t for t, _ in parts[i]), lp, last[i].finish_reason, delta=False))
        return fmt.envelope("chat.completion", self.model_name, rid, out, self._usage(ids, last))

    # -- shared

    def _stream(self, choices: Choices, ids, kind: str, rid: str, include_usage: bool, choice) -> StreamingResponse:
        """Server-sent events: one chunk per update (`choice` makes its choice object), usage if asked, [DONE]."""
        async def events():
            last: dict[int, Update] = {}
            async for i, u in choices.updates():
                if u.error:
                    yield sse(ApiError(500, u.error, type="server_error").body())
                    break
                yield sse(fmt.envelope(kind, self.model_name, rid, [choice(i, u)]))
                last[i] = u
            if include_usage:
                yield sse(fmt.envelope(kind, self.model_name, rid, [], self._usage(ids, last)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @staticmethod
    async def _collect(choices: Choices, piece):
        parts: dict[int, list] = {i: [] for i in range(len(choices.requests))}
        last: dict[int, Update] = {}
        async for i, u in choices.updates():
            if u.error:
                raise ApiError(503 if "shut down" in u.error else 500, u.error, type="server_error")
            parts[i].append(piece(i, u))
            last[i] = u
        return parts, last

    @staticmethod
    def _usage(ids: list[list[int]], last: dict[int, Update]) -> dict[str, int]:
        """Prompt tokens once per distinct prompt (its n choices share it), completion tokens of every choice."""
        prompt = sum(len(p) for j, p in enumerate(ids) if j == 0 or ids[j] is not ids[j - 1])
        return fmt.usage(prompt, sum(u.completion_tokens for u in last.values()))


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="llama_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail), code="not_found"
                                                 if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "llama_jax"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, **server.engine.stats()}

    return app
