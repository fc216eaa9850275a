"""`fastvlm-mlx serve`: OpenAI's chat completions API over one model, on FastAPI + uvicorn.

The HTTP side parses, checks and streams; one worker thread owns the model and
admits the queued requests in arrival order, prefilling each as `chat` does and
decoding up to --max-concurrency of them together (generation.BatchDecoder).
What it computes is kept: image features by content (the model's memo) and the
KV of recent conversations, found again by the longest prefix a new request
shares with them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .defaults import DEFAULT_MAX_PIXELS, DEFAULT_SYSTEM
from .errors import FastVLMError
from .fastvlm import Model
from .generation import BatchDecoder, Stats, encode, make_answer_sampler, stop_ids
from .processor import assistant_turn, first_turn, next_turn, open_image
from .prompt_cache import ModelMemo, PromptCache, image_digest, positions, shared_prefix

MAX_BODY_BYTES = 32 * 2**20  # a request, base64 images included
MAX_IMAGE_BYTES = 20 * 2**20  # an image's file, however it arrives
FETCH_TIMEOUT_S = 10.0


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


# --- the request -----------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Strict):
    url: str


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The parameters we honour; others (tools, logit_bias, ...) are ignored, as
    OpenAI-compatible local servers do."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)


@dataclass
class Conversation:
    """A request reduced to what the model reads: the system prompt, the turns
    (user text, then the assistant's answer if there is one), and the image."""

    system: str
    turns: list[tuple[str, str | None]]
    image: str | None = None  # its URL
    image_turn: int = 0


def read_messages(messages: list[Message]) -> Conversation:
    """System (or developer) messages first, then user and assistant turns, ending
    with the user's; consecutive messages of one role are one turn. One image."""
    system: list[str] = []
    turns: list[list] = []  # [user text, answer]
    image, image_turn = None, 0
    for i, m in enumerate(messages):
        text, images = _parts(m, i)
        if m.role in ("system", "developer"):
            if turns:
                raise APIError(400, f"messages[{i}]: a system message must come before the conversation")
            system.append(text)
        elif m.role == "user":
            if images:
                if image is not None or len(images) > 1:
                    raise APIError(400, "FastVLM takes one image per conversation; this request has more")
                image, image_turn = images[0], len(turns) - bool(turns and turns[-1][1] is None)
            if turns and turns[-1][1] is None:
                turns[-1][0] += "\n" + text
            else:
                turns.append([text, None])
        else:
            if images:
                raise APIError(400, f"messages[{i}]: an assistant message cannot hold an image")
            if not turns:
                raise APIError(400, f"messages[{i}]: the conversation must start with a user message")
            turns[-1][1] = text if turns[-1][1] is None else turns[-1][1] + "\n" + text
    if not turns or turns[-1][1] is not None:
        raise APIError(400, "the last message must be the user's")
    return Conversation("\n".join(system) if system else DEFAULT_SYSTEM,
                        [tuple(t) for t in turns], image, image_turn)


def _parts(m: Message, i: int) -> tuple[str, list[str]]:
    if m.content is None:
        raise APIError(400, f"messages[{i}]: content is missing")
    if isinstance(m.content, str):
        return m.content, []
    texts, images = [], []
    for part in m.content:
        if part.type == "text":
            if part.text is None:
                raise APIError(400, f"messages[{i}]: a text part needs its text")
            texts.append(part.text)
        elif part.image_url is None:
            raise APIError(400, f"messages[{i}]: an image_url part needs image_url.url")
        else:
            images.append(part.image_url.url)
    return "\n".join(texts), images


# --- images ----------------------------------------------------------------------

def fetch_image(url: str, local_dir: Path | None, max_pixels: int) -> Image.Image:
    """A data: URL, an http(s) URL (size cap, timeout), or a local path under local_dir."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise APIError(400, "image data URLs must be data:image/...;base64,...")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _too_large()
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image's data URL is not valid base64") from None
    elif url.startswith(("http://", "https://")):
        data = _download(url)
    else:
        data = _local(url.removeprefix("file://"), local_dir)
    try:
        return open_image(io.BytesIO(data), "the image", max_pixels)
    except FastVLMError as e:
        raise APIError(400, str(e), "invalid_image") from None


def _too_large() -> APIError:
    return APIError(413, f"the image is over {MAX_IMAGE_BYTES // 2**20} MB", "image_too_large")


def _download(url: str) -> bytes:
    deadline = time.monotonic() + FETCH_TIMEOUT_S  # in all: a server may send slowly
    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=True) as r:
            if r.status_code != 200:
                raise APIError(400, f"fetching the image gave HTTP {r.status_code}", "invalid_image_url")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise _too_large()
                if time.monotonic() > deadline:
                    raise APIError(400, f"fetching the image took over {FETCH_TIMEOUT_S:.0f} s", "invalid_image_url")
            return bytes(data)
    except httpx.HTTPError as e:
        raise APIError(400, f"cannot fetch the image: {type(e).__name__}", "invalid_image_url") from None


def _local(path: str, local_dir: Path | None) -> bytes:
    if local_dir is None:
        raise APIError(400, "local image paths are off; start the server with --allow-local-images DIR",
                       "invalid_image_url")
    target = Path(path).resolve()
    if not target.is_relative_to(local_dir) or not target.is_file():
        raise APIError(400, f"no image at {path} under the allowed directory", "invalid_image_url")
    if target.stat().st_size > MAX_IMAGE_BYTES:
        raise _too_large()
    return target.read_bytes()


# --- the model's side ------------------------------------------------------------

class ConversationStore:
    """The KV of recent conversations; the least recently used go past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, tuple[str | None, PromptCache]] = OrderedDict()

    def take(self, prompt: list[int], image_key: str | None) -> PromptCache | None:
        """The cache of the same image sharing the longest prefix with `prompt`, removed
        from the store (the caller puts it back when done), or None."""
        best, best_len = None, 0
        for entry, (key, cache) in self.entries.items():
            if key != image_key:
                continue
            n = shared_prefix(cache.ids, prompt)
            if n > best_len:
                best, best_len = entry, n
        return None if best is None else self.entries.pop(best)[1]

    def put(self, cache: PromptCache, image_key: str | None) -> None:
        self.entries[id(cache)] = (image_key, cache)
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, cache in self.entries.values() for c in cache.layers)


class StopText:
    """Cuts an answer at the first of the request's stop strings, holding back text
    that could be the start of one until it is known not to be."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string was reached."""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - held]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    """One request on its way through the worker; events go back to the HTTP side."""

    request: ChatRequest
    conversation: Conversation
    image: Image.Image | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the worker once the job is decoding
    prompt: list[int] = field(default_factory=list)
    key: str | None = None
    cache: PromptCache | None = None
    stops: StopText | None = None
    stats: Stats | None = None
    sampled: list[int] = field(default_factory=list)
    text: str = ""
    cut: bool = False

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Owns the model: a worker thread admits queued jobs, up to `max_concurrency`
    decoding together (generation.BatchDecoder), the others waiting in order.

    The worker lives as long as the process: with MLX 0.32 a thread that ran
    compiled functions and ended before the process makes its exit abort
    ("terminate called without an active exception") about half the time.
    """

    def __init__(self, model: Model, tokenizer, model_id: str, cache_bytes: int,
                 resolution: int | None = None, max_concurrency: int = 4):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        vision = model.args.vision_config
        self.resolution = vision.image_size if resolution is None else resolution
        vision.check_resolution(self.resolution)
        self.visual_tokens = (self.resolution // vision.stride) ** 2
        self.context = model.args.context_length
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.max_concurrency = max_concurrency
        self.decoder = BatchDecoder(model, tokenizer, stop_ids(tokenizer), max_concurrency)
        memo = ModelMemo.of(model)  # a quarter of the cache for image features, by content
        memo.images, memo.max_bytes = 1 << 20, cache_bytes // 4
        self.store = ConversationStore(cache_bytes - cache_bytes // 4)
        self.answers: OrderedDict[str, list[int]] = OrderedDict()  # answer text -> the ids sampled
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.decoding: dict[int, Job] = {}
        self.worker = threading.Thread(target=self._work, name="fastvlm-mlx engine", daemon=True)
        self.worker.start()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    @property
    def running(self) -> int:
        return len(self.decoding)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            while len(self.decoding) < self.max_concurrency:
                try:
                    job = self.jobs.get(block=not self.decoding)
                except queue.Empty:
                    break
                self._guard(job, self._admit, job)
            try:
                responses = self.decoder.step()
            except Exception as e:  # a failed step fails every answer in it
                for uid, job in list(self.decoding.items()):
                    self.decoder.cancel(uid)
                    self._fail(self.decoding.pop(uid), e)
                continue
            for uid, response in responses:
                job = self.decoding[uid]
                self._guard(job, self._deliver, uid, job, response)
            for uid, job in list(self.decoding.items()):
                if job.cancelled.is_set():
                    self.decoder.cancel(uid)
                    self._finish(uid, job, "stop")

    def _guard(self, job: Job, step, *args) -> None:
        """Run one step of a job; an error ends that job alone, the server goes on."""
        try:
            step(*args)
        except Exception as e:
            for uid, j in list(self.decoding.items()):
                if j is job:
                    self.decoder.cancel(uid)
                    del self.decoding[uid]
            self._fail(job, e)

    @staticmethod
    def _fail(job: Job, e: Exception) -> None:
        if isinstance(e, FastVLMError):
            e = APIError(400, str(e))
        elif not isinstance(e, APIError):
            e = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        job.send("error", e)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """The qwen_2 template as `chat` builds it; answers this server gave are read
        back as the ids it sampled, so their KV is found again."""
        ids: list[int] = []
        for n, (question, answer) in enumerate(conversation.turns):
            with_image = conversation.image is not None and n == conversation.image_turn
            ids += (first_turn(self.tokenizer, conversation.system, question, with_image) if n == 0
                    else next_turn(self.tokenizer, question, with_image))
            if answer is not None:
                ids += self.answers.get(answer) or assistant_turn(self.tokenizer, answer)
                ids.append(self.im_end)
        return ids

    def _admit(self, job: Job) -> None:
        """Encode the image (unless its features are known), find the conversation's KV,
        prefill what it lacks and join the batch."""
        if job.cancelled.is_set():
            return
        r = job.request
        job.prompt = self.prompt_ids(job.conversation)
        length = positions(job.prompt, self.visual_tokens)
        if length >= self.context:
            raise APIError(400, f"the prompt is {length} tokens but the model's context is {self.context}",
                           "context_length_exceeded")
        features, vision_s = None, 0.0
        if job.image is not None:
            job.key = image_digest(job.image, self.resolution)
            start = time.perf_counter()
            features = encode(self.model, job.image, self.resolution)
            vision_s = time.perf_counter() - start
        job.cache = self.store.take(job.prompt, job.key) or PromptCache(
            self.model, self.visual_tokens if job.key else 0)
        if r.seed is not None:
            mx.random.seed(r.seed)
        sampler = make_answer_sampler(self.tokenizer, self.model, r.temperature, r.top_p)
        job.stops = StopText([r.stop] if isinstance(r.stop, str) else r.stop or [])
        job.stats = Stats(visual_tokens=features.shape[1] if features is not None else 0, vision_s=vision_s)
        limit = min(r.max_completion_tokens or r.max_tokens or 512, self.context - length)
        try:
            uid = self.decoder.add(job.cache, job.prompt, features, sampler, limit, job.stats)
        except Exception:
            self.store.put(job.cache, job.key)
            raise
        self.decoding[uid] = job

    def _deliver(self, uid: int, job: Job, response) -> None:
        job.sampled.append(response.token)
        piece, job.cut = job.stops.add(response.text)
        if response.finish_reason and not job.cut:
            piece += job.stops.flush()
        job.text += piece
        if piece:
            job.send("text", piece)
        if job.cut:
            self.decoder.cancel(uid)
        if job.cut or response.finish_reason:
            self._finish(uid, job, "stop" if job.cut else response.finish_reason)

    def _finish(self, uid: int, job: Job, finish: str) -> None:
        """Keep the conversation's KV and the answer's ids; tell the client."""
        del self.decoding[uid]
        self.store.put(job.cache, job.key)
        sampled = job.sampled
        answer = sampled[:-1] if sampled and sampled[-1] in self.decoder.stop_ids else sampled
        if not job.cut and not job.cancelled.is_set():
            self.answers[job.text] = answer
            while len(self.answers) > 1024:
                self.answers.popitem(last=False)
        length, stats = job.cache.positions(job.prompt), job.stats
        usage = {"prompt_tokens": length, "completion_tokens": len(answer),
                 "total_tokens": length + len(answer),
                 "prompt_tokens_details": {"cached_tokens": length - stats.prompt_tokens}}
        timings = {"vision_ms": stats.vision_s * 1e3, "prefill_ms": stats.prefill_s * 1e3,
                   "ttft_ms": stats.ttft_s * 1e3, "decode_tokens_per_s": stats.decode_tps,
                   "prefilled_tokens": stats.prompt_tokens}
        job.send("done", finish, usage, timings)


# --- the HTTP side ---------------------------------------------------------------

def make_app(engine: Engine, api_key: str | None = None, local_images: Path | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/models, /health."""
    app = FastAPI(title="fastvlm-mlx", docs_url=None, redoc_url=None)
    local_images = local_images.resolve() if local_images else None

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        error = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                 "invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_id,
                "queue": {"waiting": engine.waiting, "running": engine.running},
                "cache": {"conversations": len(engine.store.entries), "bytes": engine.store.nbytes,
                          "images": len(ModelMemo.of(engine.model).features)}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "created": 0, "owned_by": "fastvlm-mlx"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request)
        try:
            r = ChatRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"]) from None
        conversation = read_messages(r.messages)
        image = None
        if conversation.image is not None:
            image = await asyncio.to_thread(fetch_image, conversation.image, local_images, max_pixels)
        job = Job(r, conversation, image, asyncio.get_running_loop())
        engine.submit(job)
        first = await _next_event(job, request)  # errors before any output keep their status
        if first[0] == "error":
            raise first[1]
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
        if r.stream:
            include_usage = bool(r.stream_options and r.stream_options.include_usage)
            return StreamingResponse(_stream(job, request, first, meta, include_usage),
                                     media_type="text/event-stream")
        text, event = "", first
        while event[0] == "text":
            text += event[1]
            event = await _next_event(job, request)
        if event[0] == "error":
            raise event[1]
        _, finish, usage, timings = event
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage, "timings": timings}

    return app


async def _read_body(request: Request) -> dict:
    too_large = APIError(413, f"the request is over {MAX_BODY_BYTES // 2**20} MB", "request_too_large")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise too_large  # without reading it
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise too_large
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def _next_event(job: Job, request: Request) -> tuple:
    """The worker's next event; a client gone meanwhile cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise


async def _stream(job: Job, request: Request, event: tuple, meta: dict, include_usage: bool):
    """Server-sent events as OpenAI sends them, ending in data: [DONE]."""
    def sse(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return sse({**meta, "object": "chat.completion.chunk", "choices": choices, **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while event[0] == "text":
            yield chunk({"content": event[1]})
            event = await _next_event(job, request)
        if event[0] == "error":
            yield sse(event[1].body())
        elif event[0] == "done":
            _, finish, usage, timings = event
            yield chunk({}, finish)
            if include_usage:
                yield chunk(None, usage=usage, timings=timings)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client gone mid-stream stops the generation
