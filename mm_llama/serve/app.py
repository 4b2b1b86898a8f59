"""The HTTP server: OpenAI-compatible chat completions, model list, health, and the web chat page.

    POST /v1/chat/completions   text, image_url (data: URLs) and input_audio parts; `stream: true` → SSE
    GET  /v1/models             the one model served
    GET  /health                liveness and queue length
    GET  /                      the chat page (mm_llama/serve/static/index.html)

Every bound (body size, image pixels and count, audio duration, prompt and reply length, queue length)
answers a 4xx JSON error in OpenAI's shape whose `code` names the limit; the server keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.generate import Completion, Generator, Prompt
from ..infer.loading import Capabilities, UnsupportedInput
from ..infer.media import MediaError, MediaLimits, decode_audio, decode_image
from ..infer.sampling import SamplingConfig
from ..infer.speech import audio_part, prepare_audio
from ..text import ChatFormat
from .schema import AudioPart, ChatCompletionRequest, ImagePart, TextPart
from .worker import GenerationWorker, Job, QueueFull

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]+)*?)(?P<b64>;base64)?,(?P<data>.*)", re.S)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request. `max_prompt_tokens` None means the model's context length − 1."""

    max_body_bytes: int = 20 * 2**20
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 1024
    max_queue: int = 64
    max_batch: int = 8
    media: MediaLimits = field(default_factory=MediaLimits)


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def create_app(generator: Generator, model_name: str, limits: ServerLimits = ServerLimits(),
               image_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI application serving `generator` (which must hold a tokenizer) as `model_name`.

    `image_dir`: when set, `image_url` may also be a path (or file:// URL) of a file inside this folder.
    """
    if generator.tokenizer is None:
        raise ValueError("the server needs a Generator with a tokenizer")
    worker = GenerationWorker(generator, limits.max_batch, limits.max_queue)
    converter = RequestConverter(generator, limits, Path(image_dir).resolve() if image_dir else None)
    page = (resources.files("mm_llama.serve") / "static" / "index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="mm_llama", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
            return ApiError(400, f"malformed JSON body: {detail}", "invalid_json").response()
        where = ".".join(str(p) for p in errors[0]["loc"] if p != "body")
        messages = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors[:5])
        return ApiError(400, messages, "invalid_request", where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error"
                        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "capabilities": vars(converter.capabilities)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mm_llama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                           "model_not_found", "model")
        prompt, config = await run_in_threadpool(converter.convert, body)
        try:
            job = worker.submit(prompt, config)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", "max_queue") from e
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(_sse(job, reply_id, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text: list[str] = []
        with _cancel_unless_done(job):
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    text.append(value)
                elif kind == "error":
                    raise ApiError(500, f"generation failed: {value}", "generation_failed")
                else:
                    return _completion(reply_id, model_name, "".join(text), value)

    return app


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or counted) gets 413 before any parsing.

    Hand-written because Starlette's own limit answers in plain text, not the API's JSON error shape.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"request body exceeds max_body_bytes={self.max_bytes}", "max_body_bytes").response()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices for streaming replies
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@contextlib.contextmanager
def _cancel_unless_done(job: Job):
    """If the client goes away (the handler is cancelled), the worker stops generating for it."""
    try:
        yield
    finally:
        job.cancelled.set()


def _completion(reply_id: str, model: str, text: str, done: Completion) -> dict:
    n = len(done.tokens)
    return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": done.finish_reason}],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": n,
                      "total_tokens": done.prompt_tokens + n}}


async def _sse(job: Job, reply_id: str, model: str):
    """Server-sent events: a role chunk, content chunks, a finish chunk, then `[DONE]`."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    with _cancel_unless_done(job):
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "error":
                error = {"message": f"generation failed: {value}", "type": "server_error", "code": "generation_failed"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            else:
                yield chunk({}, value.finish_reason)
                break
        yield "data: [DONE]\n\n"


class RequestConverter:
    """OpenAI messages → our chat format, images and bounds checked → (`Prompt`, `SamplingConfig`)."""

    def __init__(self, generator: Generator, limits: ServerLimits, image_dir: Path | None):
        self.generator, self.limits, self.image_dir = generator, limits, image_dir
        self.chat_format = ChatFormat(generator.tokenizer)
        self.capabilities = Capabilities.of(generator.model)
        context = generator.max_seq_len
        self.max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)

    def convert(self, body: ChatCompletionRequest) -> tuple[Prompt, SamplingConfig]:
        messages, images, audio = [], [], []
        for i, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content if message.content is not None else ""
            if isinstance(content, list):
                content = [self._part(part, f"messages[{i}].content[{j}]", images, audio)
                           for j, part in enumerate(content)]
            messages.append({"role": role, "content": content})
        if len(images) > self.limits.media.max_images:
            raise ApiError(400, f"the request holds {len(images)} images; max_images is "
                                f"{self.limits.media.max_images}", "max_images", "messages")
        try:
            tokens = self.chat_format.encode_dialog(messages, add_generation_prompt=True).tokens
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request", "messages") from e
        context = self.generator.max_seq_len
        if len(tokens) > self.max_prompt:
            raise ApiError(400, f"the prompt has {len(tokens)} tokens; max_prompt_tokens is {self.max_prompt} "
                                f"(the model's context length is {context})", "context_length_exceeded", "messages")
        wanted = body.new_tokens
        if wanted is not None and wanted > self.limits.max_new_tokens:
            raise ApiError(400, f"max_tokens {wanted} exceeds the server's max_new_tokens="
                                f"{self.limits.max_new_tokens}", "max_new_tokens", "max_tokens")
        new_tokens = min(wanted or self.limits.max_new_tokens, context - len(tokens))
        config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=body.top_p, top_k=body.top_k, stop=tuple(body.stop), seed=body.seed)
        return Prompt(tokens, images, audio=audio), config

    def _part(self, part, where: str, images: list, audio: list) -> dict:
        if isinstance(part, TextPart):
            return {"type": "text", "text": part.text}
        if isinstance(part, ImagePart):
            images.append(self._image(part.image_url.url, f"{where}.image_url"))
            self._require("image", where)
            return {"type": "image"}
        assert isinstance(part, AudioPart)
        data = self._base64(part.input_audio.data, f"{where}.input_audio.data")
        try:
            samples, rate = decode_audio(data, self.limits.media, f"{where}.input_audio")
            self._require("audio", where)
            config = self.generator.model.config
            wave = prepare_audio(samples, rate, config, f"{where}.input_audio")
        except MediaError as e:
            raise ApiError(400, str(e), e.limit or "invalid_audio", where) from e
        audio.append(wave)
        return audio_part(wave, config)

    def _require(self, kind: str, where: str) -> None:
        try:
            self.capabilities.require(kind)
        except UnsupportedInput as e:
            raise ApiError(400, f"{where}: {e}", "unsupported_input", where) from e

    def _image(self, url: str, where: str):
        if url.startswith("data:"):
            match = DATA_URL.fullmatch(url)
            if match is None or not match["b64"]:
                raise ApiError(400, f"{where}: expected a base64 data URL (data:image/...;base64,...)",
                               "invalid_image", where)
            data = self._base64(match["data"], where)
        elif self.image_dir is not None and urlparse(url).scheme in ("", "file"):
            data = self._local_file(url, where)
        else:
            allowed = "data: URLs" + (" or files under the --allow-local-images folder" if self.image_dir else "")
            raise ApiError(400, f"{where}: only {allowed} are accepted (the server never fetches remote URLs; "
                                "local files need --allow-local-images DIR)", "invalid_image_url", where)
        try:
            return decode_image(data, self.limits.media, where)
        except MediaError as e:
            raise ApiError(400, str(e), e.limit or "invalid_image", where) from e

    def _local_file(self, url: str, where: str) -> bytes:
        path = Path(unquote(urlparse(url).path) if url.startswith("file:") else url).resolve()
        if not path.is_relative_to(self.image_dir) or not path.is_file():
            raise ApiError(400, f"{where}: {path} is not a file under the allowed folder {self.image_dir}",
                           "invalid_image_url", where)
        size = path.stat().st_size
        if size > self.limits.max_body_bytes:
            raise ApiError(400, f"{where}: {size} bytes exceeds max_body_bytes={self.limits.max_body_bytes}",
                           "max_body_bytes", where)
        return path.read_bytes()

    @staticmethod
    def _base64(text: str, where: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: not valid base64", "invalid_base64", where) from e
