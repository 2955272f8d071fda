"""The HTTP face of the server: OpenAI-compatible completions, and the admin endpoints for patches.

    GET    /health                 200 once the model is loaded
    GET    /v1/models              the one served model
    POST   /v1/completions         OpenAI completions (prompt: text, texts or token ids)
    POST   /v1/chat/completions    OpenAI chat completions (the tokenizer's chat template)
    GET    /v1/patches             admin: the applied stack, oldest first
    POST   /v1/patches             admin: multipart parts `patch` and `signature`; 201 {id, sha256, nnz, provenance}
    DELETE /v1/patches/{id}        admin: revert; 409 naming the later overlapping patch that blocks it

Every answer's `system_fingerprint` names the weight state it came from ("base" or "patches:ID,...").
`"stream": true` answers as server-sent events (`data: CHUNK` lines, then `data: [DONE]`), the chunks
the openai client reads; the whole stream comes from one weight state, named in every chunk. A
stream's generation runs on a worker thread and stops when the client goes away.
Admin endpoints take `Authorization: Bearer TOKEN` (401 otherwise; 403 when the server has no token,
so patches can only be given at start-up); the check runs before an upload is parsed or stored. Errors are
OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import conversation_ids
from ..errors import InputError
from .engine import CHAT_MAX_TOKENS, Engine, Generation
from .patches import PatchStore

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text is understood here
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _check_sampling(req: _Sampling) -> list[str]:
    if (req.n or 1) != 1:
        raise ApiError(400, "n must be 1 (one answer per request)")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "stop takes at most 4 sequences")
    return stop


async def _discard_body(request: Request) -> None:
    """Read and drop a refused request's body, unparsed, so a client still sending it gets the answer
    rather than a broken pipe; one that asked `Expect: 100-continue` (curl, for large uploads) sends none."""
    if request.headers.get("expect", "").lower() != "100-continue":
        async for _ in request.stream():
            pass


def _usage(gen: Generation) -> dict:
    prompt = sum(a.prompt_tokens for a in gen.answers)
    completion = sum(a.completion_tokens for a in gen.answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def stream_events(engine: Engine, prompts: list[list[int]], kwargs: dict, chunk: Callable[[str, int, dict], dict],
                  usage_chunk: Callable[[str, dict], dict] | None) -> StreamingResponse:
    """Generate on a worker thread and answer as server-sent events, each piece of text as it is final.

    `chunk(state, index, fields)` builds one chunk from fields {"text": piece}, {"finish_reason": reason} or
    {"start": True} (once per answer when the weight state is known; None sends nothing). `usage_chunk`,
    where given, builds the last chunk from the usage (stream_options.include_usage)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def put(item) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            gen = engine.generate(prompts, on_state=lambda state: put(("state", state)),
                                  on_text=lambda i, piece: put(("text", i, piece)), cancelled=gone.is_set, **kwargs)
            put(("done", gen))
        except BaseException as err:  # noqa: BLE001 - reported in the stream, the headers are sent already
            if not isinstance(err, InputError):
                logging.getLogger("roselora_export.serve").exception("generation failed in a stream")
            put(("error", err))

    async def events() -> AsyncIterator[str]:
        loop.run_in_executor(None, work)
        state = ""
        try:
            while True:
                item = await queue.get()
                if item[0] == "state":
                    state = item[1]
                    for i in range(len(prompts)):
                        first = chunk(state, i, {"start": True})
                        if first is not None:
                            yield _sse(first)
                elif item[0] == "text":
                    yield _sse(chunk(state, item[1], {"text": item[2]}))
                elif item[0] == "done":
                    gen = item[1]
                    for i, a in enumerate(gen.answers):
                        yield _sse(chunk(gen.state, i, {"finish_reason": a.finish_reason}))
                    if usage_chunk is not None:
                        yield _sse(usage_chunk(gen.state, _usage(gen)))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    err = item[1]
                    message = str(err) if isinstance(err, InputError) else "the server failed while generating"
                    yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": 500}})
                    return
        finally:
            gone.set()  # the client went away (or the stream ended): the worker stops after its current token

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine: Engine, store: PatchStore, admin_token: str | None) -> FastAPI:
    """The FastAPI application serving `engine`, with `store` behind the admin token (None: admin is off)."""
    app = FastAPI(title="roselora-export serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, err: InputError):  # a bad request; a Refused carries its own status
        return _error(getattr(err, "status", 400), str(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    async def check_admin(request: Request) -> None:
        if admin_token is None:
            await _discard_body(request)
            raise ApiError(403, "patch administration is off: this server was started without --admin-token-file")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            await _discard_body(request)
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer TOKEN' with the server's admin token",
                           {"WWW-Authenticate": "Bearer"})

    def generate(prompts: list[list[int]], max_tokens: int, req: _Sampling, stop: list[str]) -> Generation:
        return engine.generate(prompts, max_tokens=max_tokens, temperature=req.temperature or 0.0,
                               top_p=req.top_p or 1.0, stop=stop)

    def body(head: tuple[str, str, int], state: str, choices: list, **usage) -> dict:
        """An answer or chunk: head is (id, object, created)."""
        cid, obj, created = head
        return {"id": cid, "object": obj, "created": created, "model": engine.name, "system_fingerprint": state,
                "choices": choices, **usage}

    def stream(prompts: list[list[int]], max_tokens: int, req: _Sampling, stop: list[str], chunk,
               head: tuple[str, str, int]) -> StreamingResponse:
        engine.check(prompts, max_tokens)  # refused with a status (400), before the stream starts
        wants_usage = bool((req.stream_options or {}).get("include_usage"))
        return stream_events(engine, prompts, {"max_tokens": max_tokens, "temperature": req.temperature or 0.0,
                                               "top_p": req.top_p or 1.0, "stop": stop}, chunk,
                             (lambda state, usage: body(head, state, [], usage=usage)) if wants_usage else None)

    # ---- public ---------------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.name, "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."), "patches": len(engine.runtime.active)}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "roselora-export"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream:
            prompts, stop = await run_in_threadpool(completion_prompts, req)
            head = (f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()))

            def chunk(state: str, i: int, f: dict) -> dict | None:
                choice = {"index": i, "text": f.get("text", ""), "logprobs": None, "finish_reason": f.get("finish_reason")}
                return None if "start" in f else body(head, state, [choice])

            return stream(prompts, req.max_tokens or 16, req, stop, chunk, head)
        return await run_in_threadpool(complete, req)

    def completion_prompts(req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        stop = _check_sampling(req)
        p = req.prompt
        if isinstance(p, str):
            prompts = [engine.encode_text(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [engine.encode_text(x) if isinstance(x, str) else list(x) for x in p]
        if not prompts:
            raise ApiError(400, "prompt is empty")
        return prompts, stop

    def complete(req: CompletionRequest) -> dict:
        prompts, stop = completion_prompts(req)
        gen = generate(prompts, req.max_tokens or 16, req, stop)
        return body((f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time())), gen.state,
                    [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
                     for i, a in enumerate(gen.answers)], usage=_usage(gen))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if req.stream:
            ids, max_tokens, stop = await run_in_threadpool(chat_prompt, req)
            head = (f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", int(time.time()))

            def chunk(state: str, i: int, f: dict) -> dict:
                delta = ({"role": "assistant", "content": ""} if "start" in f
                         else {"content": f["text"]} if "text" in f else {})
                return body(head, state, [{"index": i, "delta": delta, "logprobs": None,
                                           "finish_reason": f.get("finish_reason")}])

            return stream([ids], max_tokens, req, stop, chunk, head)
        return await run_in_threadpool(chat, req)

    def chat_prompt(req: ChatRequest) -> tuple[list[int], int, list[str]]:
        stop = _check_sampling(req)
        ids = conversation_ids(engine.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            room = engine.context - len(ids) if engine.context else CHAT_MAX_TOKENS
            max_tokens = max(1, min(CHAT_MAX_TOKENS, room))
        return ids, max_tokens, stop

    def chat(req: ChatRequest) -> dict:
        ids, max_tokens, stop = chat_prompt(req)
        gen = generate([ids], max_tokens, req, stop)
        a = gen.answers[0]
        return body((f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", int(time.time())), gen.state,
                    [{"index": 0, "message": {"role": "assistant", "content": a.text}, "logprobs": None,
                      "finish_reason": a.finish_reason}], usage=_usage(gen))

    # ---- admin ----------------------------------------------------------------------------------
    @app.get("/v1/patches")
    async def list_patches(request: Request) -> dict:
        await check_admin(request)
        return {"object": "list", "data": await run_in_threadpool(store.list)}

    @app.post("/v1/patches", status_code=201)
    async def post_patch(request: Request) -> dict:
        await check_admin(request)  # before the upload is parsed
        try:
            form = await request.form(max_files=2, max_fields=2)
        except Exception as err:  # not multipart, too many parts, a malformed body
            raise ApiError(400, f"send multipart/form-data with the parts 'patch' and 'signature' ({err})") from None
        try:
            part, sig = form.get("patch"), form.get("signature")
            if part is None or isinstance(part, str):
                raise ApiError(400, "multipart part 'patch' (the patch file) is missing")
            data = await part.read()
            filename = part.filename or "patch.safetensors"
            signature = (sig.encode() if isinstance(sig, str) else await sig.read()) if sig is not None else None
        finally:
            await form.close()
        return await run_in_threadpool(store.add, data, signature, filename)  # Refused: its own status

    @app.delete("/v1/patches/{patch_id}")
    async def delete_patch(patch_id: str, request: Request) -> dict:
        await check_admin(request)
        return {**await run_in_threadpool(store.remove, patch_id), "reverted": True}

    return app
