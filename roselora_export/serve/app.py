"""The HTTP face of the server: OpenAI-compatible completions, and the admin endpoints for patches.

    GET    /health                 200 once the model is loaded
    GET    /v1/models              the one served model
    POST   /v1/completions         OpenAI completions (prompt: text, texts or token ids)
    POST   /v1/chat/completions    OpenAI chat completions (the tokenizer's chat template)
    GET    /v1/patches             admin: the applied stack, oldest first
    POST   /v1/patches             admin: multipart parts `patch` and `signature`; 201 {id, sha256, nnz, provenance}
    DELETE /v1/patches/{id}        admin: revert; 409 naming the later overlapping patch that blocks it

Every answer's `system_fingerprint` names the weight state it came from ("base" or "patches:ID,...").
Admin endpoints take `Authorization: Bearer TOKEN` (401 otherwise; 403 when the server has no token,
so patches can only be given at start-up); the check runs before an upload is parsed or stored. Errors are
OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import hmac
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from .engine import CHAT_MAX_TOKENS, Engine, Generation
from .patches import PatchStore, Refused

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
    if req.stream:
        raise ApiError(400, "stream=true is not supported by this server; request the whole answer")
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


def create_app(engine: Engine, store: PatchStore, admin_token: str | None) -> FastAPI:
    """The FastAPI application serving `engine`, with `store` behind the admin token (None: admin is off)."""
    app = FastAPI(title="roselora-export serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error(err.status, err.message, err.headers)

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
        try:
            return engine.generate(prompts, max_tokens=max_tokens, temperature=req.temperature or 0.0,
                                   top_p=req.top_p or 1.0, stop=stop)
        except InputError as err:
            raise ApiError(400, str(err)) from None

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
    def completions(req: CompletionRequest) -> dict:
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
        gen = generate(prompts, req.max_tokens or 16, req, stop)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name, "system_fingerprint": gen.state,
                "choices": [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
                            for i, a in enumerate(gen.answers)],
                "usage": _usage(gen)}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict:
        stop = _check_sampling(req)
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            room = engine.context - len(ids) if engine.context else CHAT_MAX_TOKENS
            max_tokens = max(1, min(CHAT_MAX_TOKENS, room))
        gen = generate([ids], max_tokens, req, stop)
        a = gen.answers[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": engine.name, "system_fingerprint": gen.state,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "logprobs": None, "finish_reason": a.finish_reason}],
                "usage": _usage(gen)}

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
        try:
            return await run_in_threadpool(store.add, data, signature, filename)
        except Refused as err:
            raise ApiError(err.status, str(err)) from None

    @app.delete("/v1/patches/{patch_id}")
    async def delete_patch(patch_id: str, request: Request) -> dict:
        await check_admin(request)
        try:
            entry = await run_in_threadpool(store.remove, patch_id)
        except Refused as err:
            raise ApiError(err.status, str(err)) from None
        return {**entry, "reverted": True}

    return app
