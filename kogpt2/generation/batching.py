"""Continuous batching: one thread owns the model and advances every running request by one token per step, over
one KV cache whose rows are the requests' samples, each at its own position (the ``Batcher`` owns them, as a
``Decoder`` owns the one position of a batch that decodes in step). A new request is prefilled and joins
at the next step; a sample that ends, and every sample of a request whose client went away, leaves at once.

Each request draws with its own settings and its own random generator (``Draws``, as the CLI does), so its text
does not depend on which other requests share the batch, except through the floating-point rounding of batched
kernels: a matmul over 8 rows may round differently from one over 1, which can flip a near tie (as in every
serving engine that batches).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..defaults import SamplingSettings
from ..model.gpt import GPT
from ..model.kv_cache import KVCache
from .decoding_step import DecodingStep, GraphStep
from .engine import Draws, SampleText, TextSampler

CPU_BATCH = 8  # rows a CPU steps together: 8 samples draw ~4.7x the tokens/s of one on 2 cores (bench/README.md)
GPU_BATCH_LIMIT = 64
GPU_CACHE_SHARE = 0.5  # of the free memory, for the KV cache of a GPU's batch


@dataclass(frozen=True)
class TokenScore:
    """A token drawn or read, with its log-probability under the model (before any sampling setting changes it, as
    OpenAI's ``logprobs`` report) and the ``top`` most likely tokens at its place. ``logprob`` is None for a
    prompt's first token, which nothing before it predicts."""

    index: int  # the sample's
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Request:
    """``n`` samples continuing ``prompt_ids``. ``emit`` receives, from the model thread, the prompt's scores (a
    list of ``TokenScore``, when ``echo`` and ``logprobs`` ask for them), each drawn token's ``TokenScore`` (when
    ``logprobs`` is set), the samples' ``Piece``s, an exception if the model failed, and at last None. Without
    ``settings`` it only scores the prompt."""

    prompt_ids: list[int]
    settings: SamplingSettings | None
    seed: int
    n: int
    emit: Callable[[object], None]
    logprobs: int | None = None  # alternatives reported per token (0: only the token's own)
    echo: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Running:
    """A request in the batch: its draws, its samples' texts, and which samples are still going (its rows, in
    order: a request's rows are contiguous in the batch, and the requests' rows follow their order in it)."""

    def __init__(self, request: Request, draws: Draws, samples: list[SampleText], logits: torch.Tensor) -> None:
        self.request, self.draws, self.samples = request, draws, samples
        self.going = list(range(request.n))  # the sample each of its rows draws for
        self.logits = logits  # [going, vocab]: what its next tokens are drawn from
        self.tokens = torch.empty(0, dtype=torch.long)  # [going]: the tokens its rows step with next

    def draw(self) -> set[int]:
        """Draw each going sample's next token and emit what it produced; return the rows whose sample ended."""
        tokens = self.draws.draw(self.logits)
        top = self.request.logprobs
        scores = _scores(self.logits, tokens, top) if top is not None else None
        ended = set()
        for row, (index, token) in enumerate(zip(self.going, self.draws.take())):
            sample = self.samples[index]
            done = sample.push(token)
            if scores is not None:  # the end token too: a scorer reading one new token must get one
                self.request.emit(TokenScore(index, token, *scores[row]))
            if sample.piece is not None:
                self.request.emit(sample.piece)
            if done:
                ended.add(row)
        self.tokens = tokens
        return ended

    def keep(self, kept: list[int]) -> None:
        """Only these rows go on."""
        self.draws.keep(kept)
        self.going = [self.going[row] for row in kept]
        self.tokens = self.tokens[torch.tensor(kept, device=self.tokens.device)]


def _scores(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[float, tuple]]:
    """Each row's log-probability of its token, and its ``top`` most likely tokens with theirs."""
    logprobs = logits.float().log_softmax(-1)  # [rows, vocab]
    own = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    if top == 0:
        return [(value, ()) for value in own]
    values, ids = logprobs.topk(top, dim=-1)
    return [(value, tuple(zip(i, v))) for value, i, v in zip(own, ids.tolist(), values.tolist())]


def prompt_scores(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenScore]:
    """The prompt's tokens scored by the logits [prompt, vocab] of the positions before them (the first: None)."""
    following = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)
    scored = _scores(logits[:-1], following, top)
    return [TokenScore(0, prompt_ids[0], None)] + [TokenScore(0, token, value, alternatives) for token, (
        value, alternatives) in zip(prompt_ids[1:], scored)]


def _fail(request: Request, error: Exception) -> None:
    request.emit(error)
    request.emit(None)


def fitted_batch(model: GPT) -> int:
    """How many samples step together by default: ``CPU_BATCH`` on a CPU; on a GPU, as many whole-window KV cache
    rows as fit in ``GPU_CACHE_SHARE`` of the free memory, up to ``GPU_BATCH_LIMIT``."""
    weight = model.lm_head.weight
    if weight.device.type != "cuda":
        return CPU_BATCH
    c = model.config
    row_bytes = c.n_layer * 2 * c.n_embd * c.n_positions * weight.element_size()
    free, _ = torch.cuda.mem_get_info(weight.device)
    return max(1, min(GPU_BATCH_LIMIT, int(free * GPU_CACHE_SHARE) // row_bytes))


class Batcher:
    """The model thread and its waiting line. ``submit`` never blocks: a full line refuses at once."""

    def __init__(self, sampler: TextSampler, max_batch: int, max_waiting: int, static: bool | None = None) -> None:
        """``static`` (default: on CUDA): step all ``max_batch`` rows in one fixed shape, captured once as a CUDA
        graph; else step the running rows only."""
        model = sampler.model
        self.sampler, self.model, self.max_batch = sampler, model, max_batch
        self.cache = model.kv_cache(max_batch, model.config.n_positions)
        static = sampler.device.type == "cuda" if static is None else static
        self.graph = GraphStep(model, self.cache) if static else None
        self.waiting: deque[Request] = deque()  # the first stays until rows are free for it
        self.max_waiting = max_waiting
        self.arrived = threading.Condition()
        self.running: list[Running] = []
        # each row's next slot, for the rows in use (the first ones); kept on the host, so moving a row or sizing a
        # step's cache never waits for the device
        self.positions: list[int] = []
        self.steps = 0
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="kogpt2-model", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> bool:
        """Queue ``request``; False when the line is full."""
        with self.arrived:
            if len(self.waiting) >= self.max_waiting:
                return False
            self.waiting.append(request)
            self.arrived.notify()
        return True

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "rows": self.rows, "waiting": len(self.waiting), "steps": self.steps}

    def close(self) -> None:
        """Stop the model thread after its current step (a server shutting down)."""
        with self.arrived:
            self.closing = True
            self.arrived.notify()
        self.thread.join(timeout=10)

    def _work(self) -> None:
        while not self.closing:
            try:
                self._admit()
                if self.running:
                    self._advance()
            except Exception as error:  # a failed step fails the requests in it, never the server
                for running in self.running:
                    _fail(running.request, error)
                self.running, self.positions = [], []

    @torch.no_grad()
    def _admit(self) -> None:
        """Prefill, together, every waiting request that has rows free; block only while nothing runs."""
        joining, rows = [], self.rows
        while True:
            with self.arrived:
                while not self.waiting and not self.running and not joining and not self.closing:
                    self.arrived.wait()
                if not self.waiting or self.closing:
                    break
                request = self.waiting[0]
                needs = request.n if request.settings is not None else 0
                if not request.cancelled.is_set() and rows + needs > self.max_batch:
                    break
                self.waiting.popleft()
            if request.cancelled.is_set():
                request.emit(None)
                continue
            joining.append(request)
            rows += needs
        if joining:
            self._start(joining)

    def _start(self, joining: list[Request]) -> None:
        """Prefill the prompts (each one scored whole alone, the others as one padded batch) and let them join; a
        failure fails the requests not yet joined, and the running ones go on."""
        scored = [r for r in joining if r.echo and r.logprobs is not None]
        plain = [r for r in joining if r not in scored]
        pending = list(joining)
        try:
            started = [started for request in scored for started in self._prefill([request], scored=True)]
            if plain:
                started += self._prefill(plain)
            for request, last, cache, row in started:
                if request.settings is not None:
                    self._join(request, last, cache, row)
                else:
                    request.emit(None)
                pending.remove(request)
        except Exception as error:
            for request in pending:
                _fail(request, error)

    def _prefill(self, requests: list[Request], scored: bool = False) -> list[tuple[Request, torch.Tensor, KVCache,
                                                                                   int]]:
        """One forward over the prompts, right-padded to the longest (a padded slot is past its row's last real
        token, so no real token attends to it, and decoding overwrites it): each request with its last logits
        [1, vocab] and the cache row holding its prompt. ``scored`` (one request): every position's logits, to emit
        the prompt's scores."""
        lengths = [len(r.prompt_ids) for r in requests]
        width, device = max(lengths), self.sampler.device
        ids = torch.tensor([r.prompt_ids + [0] * (width - len(r.prompt_ids)) for r in requests], device=device)
        cache = self.model.kv_cache(len(requests), width)
        every = torch.arange(width, device=device)
        last = every.view(1, -1) if scored else torch.tensor(lengths, device=device) - 1
        logits = DecodingStep(self.model, len(requests))(ids, every, cache, last)  # [requests, (width,) vocab]
        if scored:
            requests[0].emit(prompt_scores(logits[0], requests[0].prompt_ids, requests[0].logprobs))
            logits = logits[:, -1]
        return [(request, logits[row:row + 1], cache, row) for row, request in enumerate(requests)]

    def _join(self, request: Request, last: torch.Tensor, prefilled: KVCache, prefilled_row: int) -> None:
        prompt, settings = request.prompt_ids, request.settings
        for row in range(self.rows, self.rows + request.n):
            self.cache.copy_row(prefilled_row, row, len(prompt), prefilled)
        self.positions += [len(prompt)] * request.n
        draws = Draws(prompt, request.n, settings, self.sampler.generator(request.seed), self.sampler.suppress,
                      self.sampler.device, request.logit_bias)
        self.running.append(Running(request, draws, self.sampler.sample_texts(prompt, settings, request.n),
                                    last.expand(request.n, -1)))

    @torch.no_grad()
    def _advance(self) -> None:
        """Draw every running sample's next token, let the ended and the abandoned leave, and step the rest."""
        ended = {}
        for running in self.running:
            every = set(range(len(running.going)))
            if running.request.cancelled.is_set():
                ended[running] = every
                continue
            try:
                ended[running] = running.draw()
            except Exception as error:  # this request's settings failed (say, a distribution of NaNs): it alone ends
                running.request.emit(error)
                ended[running] = every
        self._close_gaps(ended)
        if self.rows:
            self._step()

    def _close_gaps(self, ended: dict[Running, set[int]]) -> None:
        """The rows that go on move up, in order, into the gaps the ended ones left; a request with none left ends."""
        positions, old = [], 0
        for running in self.running:
            for row in range(len(running.going)):
                if row not in ended[running]:
                    if len(positions) != old:
                        self.cache.copy_row(old, len(positions), self.positions[old])
                    positions.append(self.positions[old])
                old += 1
        going = []
        for running in self.running:
            gone = ended[running]
            if len(gone) == len(running.going):
                running.request.emit(None)
                continue
            if gone:
                running.keep([row for row in range(len(running.going)) if row not in gone])
            going.append(running)
        self.running, self.positions = going, positions

    def _step(self) -> None:
        tokens = torch.cat([running.tokens for running in self.running])  # [rows]
        rows, device = self.rows, tokens.device
        if self.graph is not None:  # every row; a free one writes into its own first slot, unread
            padded = torch.zeros(self.max_batch, dtype=torch.long, device=device)
            padded[:rows] = tokens
            logits = self.graph(padded, self.positions + [0] * (self.max_batch - rows))[:rows]
        else:
            positions = torch.tensor(self.positions, device=device).view(-1, 1)  # [rows, 1]
            cache = self.cache.view(rows, max(self.positions) + 1)
            logits = DecodingStep(self.model, rows)(tokens.view(-1, 1), positions, cache)
        self.positions = [position + 1 for position in self.positions]
        self.steps += 1
        for running, part in zip(self.running, logits.split([len(r.going) for r in self.running])):
            running.logits = part
