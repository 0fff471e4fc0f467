"""``generator.py --serve``: a local web page and an OpenAI-compatible HTTP API over the same sampling engine as the
CLI, with continuous batching (``generation/batching.py``): concurrent requests decode together, each with its own
settings and seed. Answers and errors take OpenAI's shapes, so the ``openai`` client and lm-eval use it as they are.
"""

import asyncio
import errno
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

from ..corpus.chat_format import ChatFormat, conversation, history_note, history_turns
from ..defaults import API_KEY_ENV, CHAT_SAMPLING, MAX_BODY_BYTES, SAMPLING, SamplingSettings
from ..errors import KoGPT2Error
from ..generation.batching import Batcher, Request, TokenScore, fitted_batch
from ..generation.engine import Piece, TextSampler, chat_sampler, new_seed
from ..store.opening import OpenedModel
from .logprobs import TokenLogprobs

SERVE_INSTALL = "pip install -r requirements-serve.txt  (fastapi, uvicorn)"
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ServeOptions:
    name: str | None  # the model's id in the API (None: the checkpoint's file name)
    host: str
    port: int
    history: int | None  # --history: earlier chat turns kept (None: as many as the model learnt with)
    api_key: str | None
    max_batch: int | None  # None: fitted to the device
    max_queue: int


class ApiError(Exception):
    """A request refused, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Completion:
    """One HTTP request's model requests (one a prompt), their events delivered to the request's event loop as
    (prompt index, event)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self.requests: list[Request] = []

    def add(self, prompt_ids: list[int], settings: SamplingSettings | None, seed: int, n: int,
            logprobs: int | None = None, echo: bool = False, logit_bias: dict | None = None) -> None:
        index = len(self.requests)
        self.requests.append(Request(prompt_ids, settings, seed, n, lambda event: self.loop.call_soon_threadsafe(
            self.events.put_nowait, (index, event)), logprobs, echo, logit_bias or {}))

    def submit(self) -> None:
        """Queue every prompt, or none: a full line is a 503 the client may retry."""
        for request in self.requests:
            if not self.batcher.submit(request):
                self.cancel()
                raise ApiError(503, f"the server is busy ({self.batcher.max_waiting} requests are waiting); retry in "
                                    f"{RETRY_AFTER_SECONDS} s", "server_error", "server_busy",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled.set()

    async def __aiter__(self):
        open_requests = len(self.requests)
        try:
            while open_requests:
                index, event = await self.events.get()
                if event is None:
                    open_requests -= 1
                elif isinstance(event, Exception):
                    reason = (str(event).strip().splitlines() or [type(event).__name__])[0]
                    raise ApiError(500, f"the model failed on this request: {reason}", "server_error")
                else:
                    yield index, event
        finally:  # done, or the client went away: either way its rows leave the batch at the next step
            self.cancel()


@dataclass
class Choice:
    """One choice as it grows: its text, its end, its token count and, when asked, its ``logprobs``."""

    index: int
    text: str = ""
    finish: str = "length"
    tokens: int = 0
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class ApiShape:
    """How one of the two APIs shapes its answers (OpenAI's completions or chat completions)."""

    object: str
    chunk_object: str
    id_prefix: str
    piece: Callable[[str], dict]  # a streamed piece's fields
    answer: Callable[[Choice], dict]  # a whole answer's fields
    first: Callable[[int], dict | None]  # a choice's first streamed chunk, before its text


TEXT_API = ApiShape("text_completion", "text_completion", "cmpl", lambda text: {"text": text},
                    lambda choice: {"text": choice.text, "logprobs": choice.logprobs and choice.logprobs.whole()},
                    lambda index: None)
CHAT_API = ApiShape("chat.completion", "chat.completion.chunk", "chatcmpl", lambda text: {"delta": {"content": text}},
                    lambda choice: {"message": {"role": "assistant", "content": choice.text.rstrip()}},
                    lambda index: {"index": index, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None})


class Prompt(NamedTuple):
    ids: list[int]  # what the model reads
    text: str  # what an echo shows: the ids decoded, so that its tokens' texts join into it
    added: int  # start tokens the server put before the text (not echoed)


class Answer:
    """A completion's choices, filled from the model thread's events: choice ``prompt * n + sample`` of each prompt,
    as OpenAI numbers them. ``echo`` texts start with their prompt."""

    def __init__(self, tokenizer, prompts: list[Prompt], n: int, logprobs: int | None, echo: bool) -> None:
        self.n, self.prompts = n, prompts
        self.prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
        self.choices = []
        for prompt in prompts:
            for _ in range(n):
                choice = Choice(len(self.choices), prompt.text if echo else "")
                if logprobs is not None:
                    context = prompt.ids[:prompt.added] if echo else prompt.ids
                    choice.logprobs = TokenLogprobs(tokenizer, context, 0 if echo else len(prompt.text))
                self.choices.append(choice)

    def take(self, prompt: int, event: object) -> list[tuple[Choice, str | None]]:
        """Fold ``event`` in; the choices it touched, each with the text it added (None: no text)."""
        if isinstance(event, list):  # the prompt's scores (echo), the same for each of its n choices
            shown = event[self.prompts[prompt].added:]  # a start token the server added is not echoed
            if shown:  # as OpenAI: nothing shown before the first token predicts it
                shown[0] = replace(shown[0], logprob=None, top=())
            touched = self.choices[prompt * self.n:(prompt + 1) * self.n]
            for choice in touched:
                for score in shown:
                    choice.logprobs.add(score)
            return [(choice, None) for choice in touched]
        choice = self.choices[prompt * self.n + event.index]
        if isinstance(event, TokenScore):
            choice.logprobs.add(event)
            return []
        piece: Piece = event
        choice.text += piece.text
        if piece.done:
            choice.finish, choice.tokens = piece.finish, piece.tokens
        return [(choice, piece.text)]

    def usage(self) -> dict:
        completion = sum(choice.tokens for choice in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


async def streamed(completion: Completion, answer: Answer, head: dict, api: ApiShape, usage: bool):
    """Server-sent events, one a piece, then (with ``include_usage``) the usage, then ``[DONE]``."""
    extra = {"usage": None} if usage else {}

    def event(choices: list[dict], **fields) -> str:
        body = {**head, "object": api.chunk_object, "choices": choices, **extra, **fields}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def piece(choice: Choice, text: str, done: bool) -> dict:
        fields = {"index": choice.index, **api.piece(text)}
        if choice.logprobs is not None:
            fields["logprobs"] = choice.logprobs.new()
        return {**fields, "finish_reason": choice.finish if done else None}

    try:
        for choice in answer.choices:  # chat: the role first; echo: the prompt first
            first = api.first(choice.index) or (piece(choice, choice.text, False) if choice.text else None)
            if first:
                yield event([first])
        finished = set()
        async for prompt, item in completion:
            for choice, text in answer.take(prompt, item):
                done = isinstance(item, Piece) and item.done
                if done:
                    finished.add(choice.index)
                yield event([piece(choice, text or "", done)])
        for choice in answer.choices:  # a prompt only scored (echo, max_tokens 0) ends here
            if choice.index not in finished:
                yield event([piece(choice, "", True)])
        if usage:
            yield event([], usage=answer.usage())
        yield "data: [DONE]\n\n"
    except ApiError as error:
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}}, ensure_ascii=False)}\n\n"
    finally:  # a client gone before the first event leaves the batch too
        completion.cancel()


async def collected(completion: Completion, answer: Answer, head: dict, api: ApiShape, http_request) -> dict:
    """The whole answers in one body. The client's connection is watched meanwhile: one that goes away cancels
    the work at the next step, as a stream's does."""
    async def watch() -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        completion.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for prompt, item in completion:
            answer.take(prompt, item)
    finally:
        watcher.cancel()
    choices = [{"index": c.index, **api.answer(c), "finish_reason": c.finish} for c in answer.choices]
    return {**head, "object": api.object, "choices": choices, "usage": answer.usage()}


def context_error(window: int, prompt: int, completion: int) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {window} tokens, however you requested "
                         f"{prompt + completion} tokens ({prompt} in your prompt; {completion} for the completion). "
                         "Please reduce your prompt; or completion length.", code="context_length_exceeded",
                    param="prompt")


def create_app(opened: OpenedModel, options: ServeOptions):
    from fastapi import Depends, FastAPI, Header, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from .schema import ChatRequest, CompletionRequest, validation_message

    chat, tokenizer, name = opened.chat, opened.tokenizer, options.name
    window = opened.model.config.n_positions
    chat_format = ChatFormat(tokenizer) if chat else None
    turns = history_turns(opened.chat_turns, options.history)
    sampler = chat_sampler(opened.model, chat_format) if chat else TextSampler(opened.model, tokenizer)
    max_batch = options.max_batch or fitted_batch(opened.model)
    batcher = Batcher(sampler, max_batch, options.max_queue)
    app = FastAPI(title="kogpt2-finetune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(ApiError)
    async def refused(request: HttpRequest, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return ApiError(400, message, param=param).response()

    @app.exception_handler(KoGPT2Error)
    async def kogpt2_refused(request: HttpRequest, exc: KoGPT2Error):
        return ApiError(400, str(exc)).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException):
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        message = (f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405
                   else str(exc.detail))
        return ApiError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    def authorized(authorization: str | None = Header(None)) -> None:
        if options.api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), options.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: give it as 'Authorization: Bearer KEY' (the server's "
                                "--api_key)" if given else "You didn't provide an API key: give it as "
                                "'Authorization: Bearer KEY' (the server's --api_key)", code="invalid_api_key")

    api = [Depends(authorized)]

    def model_card() -> dict:
        base = CHAT_SAMPLING if chat else SAMPLING
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "kogpt2-finetune",
                "mode": "chat" if chat else "text", "context_length": window, "defaults": base.to_dict(),
                **({"history": turns} if chat else {})}

    def served(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(404, f"The model '{model}' does not exist: this server serves '{name}'",
                           code="model_not_found", param="model")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("kogpt2.serve.web").joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/app.js")
    async def script() -> Response:
        text = resources.files("kogpt2.serve.web").joinpath("app.js").read_text(encoding="utf-8")
        return Response(text, media_type="text/javascript; charset=utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "max_batch": max_batch, **batcher.load,
                "key": options.api_key is not None}

    @app.get("/v1/models", dependencies=api)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", dependencies=api)
    async def model(model: str) -> dict:
        served(model)
        return model_card()

    def settings_of(body, base: SamplingSettings, max_tokens: int) -> SamplingSettings:
        """The request's sampling fields (each setting but ``text_size`` has one of its name) over ``base``."""
        given = {f.name: getattr(body, f.name) for f in fields(SamplingSettings) if f.name != "text_size"}
        return base.updated({**given, "text_size": max_tokens})

    def logit_bias(body) -> dict[int, float]:
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
        unknown = [token for token in bias if token >= tokenizer.vocab_size]
        if unknown:
            raise ApiError(400, f"logit_bias: token id {unknown[0]} is not in this model's vocabulary of "
                                f"{tokenizer.vocab_size}", param="logit_bias")
        return bias

    def check_n(n: int) -> None:
        if n > max_batch:
            raise ApiError(400, f"n: at most {max_batch} samples per prompt here (the server's --max_batch)",
                           param="n")

    def prompt_of(prompt: str | list[int]) -> Prompt:
        """A text prompt starts with the start token, as in training: the one it writes (``<s>`` is read as the
        token), else one added and never echoed. Token ids are taken as they are."""
        if isinstance(prompt, str):
            ids, added = sampler.framed(prompt)
            return Prompt(ids, tokenizer.decode(ids), added)
        bad = [token for token in prompt if not 0 <= token < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is not in this model's vocabulary of "
                                f"{tokenizer.vocab_size}", param="prompt")
        return Prompt(list(prompt), tokenizer.decode(prompt), 0)

    @app.post("/v1/completions", dependencies=api)
    async def completions(body: CompletionRequest, http_request: HttpRequest):
        served(body.model)
        if chat:
            raise ApiError(400, "this is a chat checkpoint: use /v1/chat/completions")
        check_n(body.n)
        if len(body.prompts()) > options.max_queue:
            raise ApiError(400, f"prompt: at most {options.max_queue} prompts per request here (the server's "
                                "--max_queue)", param="prompt")
        prompts = [prompt_of(prompt) for prompt in body.prompts()]
        longest = max(len(prompt.ids) for prompt in prompts)
        asked = body.max_tokens if body.max_tokens is not None else max(0, min(SAMPLING.text_size, window - longest))
        if longest + asked > window or (asked == 0 and not body.echo):
            raise context_error(window, longest, max(asked, 1))
        settings = settings_of(body, SAMPLING, max(asked, 1))
        seed = body.seed if body.seed is not None else new_seed()
        completion = Completion(batcher)
        for number, prompt in enumerate(prompts):  # prompt k draws with seed + k: its own generator
            completion.add(prompt.ids, settings if asked else None, seed + number, body.n, body.logprobs, body.echo,
                           logit_bias(body))
        answer = Answer(tokenizer, prompts, body.n, body.logprobs, body.echo)
        return await respond(completion, answer, settings, seed, body, TEXT_API, http_request)

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(body: ChatRequest, http_request: HttpRequest):
        served(body.model)
        if not chat:
            raise ApiError(400, "this checkpoint was not trained with --chat: use /v1/completions")
        check_n(body.n)
        talk = conversation((m.role, m.content) for m in body.messages)
        asked = settings_of(body, CHAT_SAMPLING, body.max_tokens or CHAT_SAMPLING.text_size)
        prompt_ids, room = chat_format.answer_prompt(talk.question, talk.history, window, asked.text_size, turns)
        settings = asked.with_value("text_size", room)
        seed = body.seed if body.seed is not None else new_seed()
        completion = Completion(batcher)
        completion.add(prompt_ids, settings, seed, body.n, logit_bias=logit_bias(body))
        answer = Answer(tokenizer, [Prompt(prompt_ids, "", 0)], body.n, None, False)
        return await respond(completion, answer, settings, seed, body, CHAT_API, http_request, talk.note)

    async def respond(completion: Completion, answer: Answer, settings: SamplingSettings, seed: int, body,
                      api: ApiShape, http_request, note: str | None = None):
        completion.submit()
        head = {"id": f"{api.id_prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name,
                "system_fingerprint": None, "seed": seed, "settings": settings.to_dict(),
                **({"notes": [note]} if note else {})}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(streamed(completion, answer, head, api, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collected(completion, answer, head, api, http_request)

    return app


class BodyLimit:
    """A request body over ``limit`` bytes gets 413 before anything reads it whole."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = ApiError(413, f"the request body is over {self.limit // 2**20} MiB", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body"):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([whole], receive), send)


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_options(args) -> ServeOptions:
    """The server's options from ``generator.py``'s flags, checked before a model is opened: the key from
    ``--api_key`` or the environment, required beyond this computer."""
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(args.host):
        raise KoGPT2Error(f"--host {args.host} opens the server to your network: give it a key with --api_key KEY "
                          f"(or set {API_KEY_ENV}), which every client then sends as 'Authorization: Bearer KEY'")
    return ServeOptions(args.served_name, args.host, args.port, args.history, key, args.max_batch, args.max_queue)


def serve(opened: OpenedModel, options: ServeOptions) -> None:
    source = opened.source
    options = replace(options, name=options.name or (Path(source).stem if source.endswith(".tar") else source))
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise KoGPT2Error(f"--serve needs the web server packages: {SERVE_INSTALL}") from None
    listening = listening_socket(options.host, options.port)
    server = uvicorn.Server(uvicorn.Config(create_app(opened, options), log_level="warning"))
    note = history_note(opened.chat_turns, history_turns(opened.chat_turns, options.history)) if opened.chat else None
    if note:
        print(note, file=sys.stderr)
    shown = f"[{options.host}]" if ":" in options.host else options.host
    endpoint = "/v1/chat/completions" if opened.chat else "/v1/completions"
    print(f"serving {options.name} ({opened.source}) at http://{shown}:{options.port}/  (API: {endpoint}"
          f"{'; key required' if options.api_key else ''}; Ctrl-C stops)", flush=True)
    app = server.config.app
    with listening:
        try:
            server.run(sockets=[listening])
        finally:
            app.state.batcher.close()
    if not server.started:
        raise KoGPT2Error(f"the web server on {options.host}:{options.port} did not start (its message is above)")


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
