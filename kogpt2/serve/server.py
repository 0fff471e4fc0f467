"""``generator.py --serve``: a local web page and an OpenAI-style HTTP API over the same sampling engine as the CLI.

One worker thread owns the model: requests wait in a queue and run one at a time (a request's ``n`` samples are
drawn together as one batch), so no two threads are ever inside the model. A client that disconnects mid-stream
cancels its generation, and the next request starts at once.
"""

import asyncio
import errno
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

from ..corpus.chat_format import ChatFormat, conversation, history_note, history_turns
from ..defaults import CHAT_SAMPLING, SAMPLING, SamplingSettings
from ..errors import KoGPT2Error
from ..generation.engine import Piece, TextSampler, chat_sampler, new_seed
from ..store.opening import OpenedModel

SERVE_INSTALL = "pip install -r requirements-serve.txt  (fastapi, uvicorn)"


@dataclass
class Job:
    prompt_ids: list[int]
    settings: SamplingSettings
    seed: int
    n: int
    emit: Callable[[Piece | None], None]  # None: the job is over
    cancelled: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    """The one thread that runs the model, taking jobs in the order they came."""

    def __init__(self, sampler: TextSampler) -> None:
        self.sampler = sampler
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._work, name="kogpt2-model", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if not job.cancelled.is_set():
                    for piece in self.sampler.stream(job.prompt_ids, job.settings, job.seed, job.n):
                        job.emit(piece)
                        if job.cancelled.is_set():
                            break
            finally:
                job.emit(None)


class Completion:
    """One request's pieces, delivered from the worker thread to the request's event loop."""

    def __init__(self, worker: ModelWorker, prompt_ids: list[int], settings: SamplingSettings, seed: int, n: int):
        self.loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
        self.job = Job(prompt_ids, settings, seed, n, lambda p: self.loop.call_soon_threadsafe(self.pieces.put_nowait, p))
        worker.jobs.put(self.job)

    async def __aiter__(self):
        try:
            while (piece := await self.pieces.get()) is not None:
                yield piece
        finally:  # done, or the client went away: either way the worker may move on
            self.job.cancelled.set()


def sampling_settings(body: dict, base: SamplingSettings) -> SamplingSettings:
    """A request's sampling fields over ``base``; OpenAI's ``max_tokens`` is our ``text_size``."""
    names = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram", "stop")
    return base.updated({"text_size": body.get("max_tokens"), **{name: body.get(name) for name in names}})


@dataclass(frozen=True)
class ApiShape:
    """How one of the two APIs shapes its answers (OpenAI's completions or chat completions)."""

    object: str
    chunk_object: str
    id_prefix: str
    piece: Callable[[str], dict]  # a streamed piece's fields
    answer: Callable[[str], dict]  # a whole answer's fields


TEXT_API = ApiShape("text_completion", "text_completion", "cmpl", lambda text: {"text": text},
                    lambda text: {"text": text, "logprobs": None})
CHAT_API = ApiShape("chat.completion", "chat.completion.chunk", "chatcmpl", lambda text: {"delta": {"content": text}},
                    lambda text: {"message": {"role": "assistant", "content": text.rstrip()}})


async def streamed(completion: Completion, head: dict, api: ApiShape):
    """Server-sent events, one a piece, then ``[DONE]``."""
    async for piece in completion:
        choice = {"index": piece.index, **api.piece(piece.text), "finish_reason": piece.finish}
        yield f"data: {json.dumps({**head, 'object': api.chunk_object, 'choices': [choice]}, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def collected(completion: Completion, head: dict, api: ApiShape, prompt_tokens: int, n: int) -> dict:
    """The whole answers in one body, with their token counts."""
    texts, finishes, counts = [""] * n, ["length"] * n, [0] * n
    async for piece in completion:
        texts[piece.index] += piece.text
        if piece.finish:
            finishes[piece.index], counts[piece.index] = piece.finish, piece.tokens
    choices = [{"index": i, **api.answer(text), "finish_reason": finish}
               for i, (text, finish) in enumerate(zip(texts, finishes))]
    return {**head, "object": api.object, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                      "total_tokens": prompt_tokens + sum(counts)}}


def create_app(opened: OpenedModel, name: str, history: int | None = None):
    """``history``: ``--history``, the earlier turns a chat answer sees (None: as many as the model learnt with)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    from .schema import ChatRequest, CompletionRequest, validation_message

    chat = opened.chat
    chat_format = ChatFormat(opened.tokenizer) if chat else None
    turns = history_turns(opened.chat_turns, history)
    sampler = chat_sampler(opened.model, chat_format) if chat else TextSampler(opened.model, opened.tokenizer)
    worker = ModelWorker(sampler)
    app = FastAPI(title="kogpt2-finetune", docs_url=None, redoc_url=None)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(validation_message(exc.errors()))

    @app.exception_handler(KoGPT2Error)
    async def refused(request: Request, exc: KoGPT2Error) -> JSONResponse:
        return error(str(exc))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("kogpt2.serve.web").joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/app.js")
    async def script() -> Response:
        text = resources.files("kogpt2.serve.web").joinpath("app.js").read_text(encoding="utf-8")
        return Response(text, media_type="text/javascript; charset=utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "waiting": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models() -> dict:
        base = CHAT_SAMPLING if chat else SAMPLING
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "kogpt2-finetune",
                                            "mode": "chat" if chat else "text", "defaults": base.to_dict(),
                                            **({"history": turns} if chat else {})}]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        if chat:
            raise KoGPT2Error("this is a chat checkpoint: use /v1/chat/completions")
        body = request.model_dump()
        settings = sampling_settings(body, SAMPLING)
        prompt_ids = sampler.prompt_ids(request.prompt)
        return await respond(prompt_ids, settings, body, TEXT_API)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        if not chat:
            raise KoGPT2Error("this checkpoint was not trained with --chat: use /v1/completions")
        body = request.model_dump()
        talk = conversation((m.role, m.content) for m in request.messages)
        settings = sampling_settings(body, CHAT_SAMPLING)
        prompt_ids, room = chat_format.answer_prompt(talk.question, talk.history, opened.model.config.n_positions,
                                                     settings.text_size, turns)
        return await respond(prompt_ids, settings.with_value("text_size", room), body, CHAT_API, talk.note)

    async def respond(prompt_ids: list[int], settings: SamplingSettings, body: dict, api: ApiShape,
                      note: str | None = None):
        seed = body["seed"] if body.get("seed") is not None else new_seed()
        completion = Completion(worker, prompt_ids, settings, seed, body["n"])
        head = {"id": f"{api.id_prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name,
                "seed": seed, "settings": settings.to_dict(), **({"notes": [note]} if note else {})}
        if body["stream"]:
            return StreamingResponse(streamed(completion, head, api), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collected(completion, head, api, len(prompt_ids), body["n"])

    return app


def serve(opened: OpenedModel, name: str, host: str, port: int, history: int | None = None) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise KoGPT2Error(f"--serve needs the web server packages: {SERVE_INSTALL}") from None
    listening = listening_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(opened, name, history), log_level="warning"))
    note = history_note(opened.chat_turns, history_turns(opened.chat_turns, history)) if opened.chat else None
    if note:
        print(note, file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} at http://{shown}:{port}/  (API: /v1/completions{', /v1/chat/completions' if opened.chat else ''}; Ctrl-C stops)", flush=True)
    with listening:
        server.run(sockets=[listening])
    if not server.started:
        raise KoGPT2Error(f"the web server on {host}:{port} did not start (its message is above)")


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the banner names its address: a port in use is one line naming ``--port``,
    never the address and then the web server's own error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if os.name == "posix":  # a restart need not wait out TIME_WAIT; elsewhere it would share a port in use
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise KoGPT2Error(f"port {port} on {host} is in use (another server?); choose another --port") from None
        raise KoGPT2Error(f"cannot serve on {host}:{port}: {error.strerror}; check --host, or choose another "
                          "--port") from None
    return sock
