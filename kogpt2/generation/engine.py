"""The sampling engine: autoregressive decoding with the KV cache (one token of work per step), turned into text
pieces per sample. It never prints; the prompt loop, training samples, chat and the server all read its pieces."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..corpus.chat_format import ChatFormat
from ..corpus.tokenizer import Tokenizer, encode_with_special_tokens
from ..defaults import TRAINING_SAMPLE, TRAINING_SAMPLE_QUESTION, SamplingSettings
from ..errors import KoGPT2Error
from ..model.gpt import GPT
from ..runtime import HostCopy
from .decoding_step import DecodingStep, graph_step
from .sampling import (apply_logit_bias, apply_presence_frequency, apply_repetition_penalty,
                       block_repeated_ngrams, drawable, sample_next)


def never_generated(tokenizer: Tokenizer) -> list[int]:
    """Tokens that only ever mean noise in output: unknown, padding, and a start token distinct from the end."""
    return sorted({tokenizer.unk_id, tokenizer.pad_id} | ({tokenizer.bos_id} - {tokenizer.eos_id}))


class Decoder:
    """A batch of samples decoding together over one KV cache, and the one owner of their position: the next slot
    to write, passed to every model call (as gpt-fast passes ``input_pos``)."""

    def __init__(self, model: GPT, batch: int, slots: int, static: bool) -> None:
        """``static``: fixed-shape steps over a cache of the model's whole window (each attending over the fewest
        slots that hold the position), replayed as CUDA graphs on CUDA (the model's one ``GraphStep`` for this
        batch size, so one such decoding at a time per model and batch size: the CLI and training samples each
        decode to the end before the next, and the server's batch has its own); else a cache of ``slots`` for this
        call."""
        self.graph = graph_step(model, batch) if static else None
        self.cache = self.graph.cache if static else model.kv_cache(batch, slots)
        self.kernels = DecodingStep(model, batch)
        self.position = 0

    @property
    def full(self) -> bool:
        return self.position == self.cache.capacity

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] after ``ids`` [batch, time], written from the cache's first slot."""
        input_pos = torch.arange(ids.shape[1], device=ids.device)
        logits = self.kernels(ids, input_pos, self.cache)
        self.position = ids.shape[1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] after one new token per row, ``tokens`` [batch]."""
        if self.graph is not None:
            logits = self.graph(tokens, self.position)
        else:
            input_pos = torch.tensor([self.position], device=tokens.device)
            logits = self.kernels(tokens.view(-1, 1), input_pos, self.cache)
        self.position += 1
        return logits

    def keep_rows(self, rows: torch.Tensor) -> bool:
        """Go on with these rows only; False where the shape is fixed (the graph's), and every row stays."""
        if self.graph is not None:
            return False
        self.cache.keep_rows(rows)
        self.kernels = DecodingStep(self.kernels.model, len(rows))
        return True


class Sample(Protocol):
    def push(self, token: int) -> bool:
        """Take the sample's next token; True when it ends the sample (the one place an end is decided)."""


class TokenList:
    """A sample kept as token ids, for callers that want ids rather than text: it ends at ``end_id`` (which it
    does not keep), or only at its length when None."""

    def __init__(self, end_id: int | None = None) -> None:
        self.end_id, self.ids = end_id, []

    def push(self, token: int) -> bool:
        if token == self.end_id:
            return True
        self.ids.append(token)
        return False


class Draws:
    """The samples of one prompt as they are drawn: every row's tokens so far (for the n-gram block, the penalties
    and a slide of the window) and the one chain from a step's logits to the next tokens, so the CLI and the
    server's batch draw alike for the same settings and seed. A draw stays on the device (``draw``) until the
    host takes its tokens (``take``), which it must do before the next draw (the n-gram block reads them)."""

    def __init__(self, prompt_ids: list[int], rows: int, settings: SamplingSettings, rng: torch.Generator | None,
                 suppress: list[int], device: torch.device, logit_bias: dict[int, float] | None = None) -> None:
        self.settings, self.rng = settings, rng
        bias = logit_bias or {}
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long, device=device)  # made once, not every token
        self.bias = torch.tensor(list(bias.values()), device=device)
        self.rows = [list(prompt_ids) for _ in range(rows)]  # prompt and new tokens of each batch row
        self.blocked = torch.tensor(list(suppress), dtype=torch.long, device=device)
        # [rows, tokens] for the repetition penalty; [rows, vocab] counts of new tokens for OpenAI's penalties
        self.seen = torch.tensor(self.rows, device=device) if settings.repetition_penalty != 1.0 else None
        self.counts: torch.Tensor | None = None
        self.counting = settings.presence_penalty != 0 or settings.frequency_penalty != 0
        self.drawn: HostCopy | None = None

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row [rows], drawn from ``logits`` [rows, vocab] on the device; its copy to the
        host is queued for ``take``."""
        s = self.settings
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, s.repetition_penalty)
        if self.counting:
            if self.counts is None:
                self.counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
            logits = apply_presence_frequency(logits, self.counts, s.presence_penalty, s.frequency_penalty)
        logits = apply_logit_bias(logits, self.bias_ids, self.bias)
        logits = block_repeated_ngrams(logits, self.rows, s.no_repeat_ngram)
        if len(self.blocked):
            logits = logits.index_fill(1, self.blocked, float("-inf"))
        tokens = sample_next(logits, s.temperature, s.top_k, s.top_p, self.rng)  # [rows]
        # a row with no distribution to draw from reaches the host as -1 (the device keeps a valid id)
        self.drawn = HostCopy(torch.where(drawable(logits), tokens, -1))
        if self.seen is not None:
            self.seen = torch.cat([self.seen, tokens.view(-1, 1)], dim=1)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens.view(-1, 1), torch.ones_like(tokens, dtype=torch.int32).view(-1, 1))
        return tokens

    def take(self) -> list[int]:
        """Each row's token of the last draw, read from the device (the host waits here, once per draw) and taken
        into the rows."""
        tokens = self.drawn.read()
        if min(tokens) < 0:
            raise KoGPT2Error("the model's next-token scores are not numbers (NaN or infinite), so nothing can be "
                              "drawn: its weights are damaged or overflow this precision; try --dtype fp32")
        for row, token in zip(self.rows, tokens):
            row.append(token)
        return tokens

    def keep(self, kept: list[int]) -> None:
        """Only these rows draw on (their samples go on)."""
        self.rows = [self.rows[r] for r in kept]
        index = torch.tensor(kept, device=self.blocked.device)
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], settings: SamplingSettings, samples: list[Sample],
                 rng: torch.Generator | None = None, suppress: list[int] = (),
                 static: bool | None = None) -> Iterator[int]:
    """Draw tokens for ``samples``, all continuing ``prompt_ids``, until each ends or has ``text_size`` tokens;
    yield a sample's index each time it has taken a token.

    A sample that ends leaves the batch after one more step (run before the host knew it ended, then discarded), so
    it costs no further steps and feeds no penalty (with fixed-shape steps its row runs on, unread). ``suppress``
    lists token ids never to produce (see ``never_generated``). ``static`` (default: on CUDA) decodes with
    fixed-shape steps replayed as CUDA graphs; the tokens are the same either way. Sampling stays on the device;
    the one host sync per token is reading the new tokens, and the next step is queued before it, so the device
    computes while the host waits, pushes the tokens to the samples and decides which end. Past the model's
    positions the context slides: the cache is rebuilt from the newest half of the text.
    """
    if not prompt_ids:
        raise KoGPT2Error("a prompt needs at least one token")
    device = next(model.parameters()).device
    static = device.type == "cuda" if static is None else static
    window = model.config.n_positions
    prompt = list(prompt_ids[-window:])
    batch = len(samples)
    draws = Draws(prompt, batch, settings, rng, suppress, device)
    owner = list(range(batch))  # the sample each going row draws for, in the draws' order
    rows = torch.arange(batch, device=device)  # and its row in the decoder's batch
    decoder = Decoder(model, batch, min(window, len(prompt) + settings.text_size), static)

    def whole_batch(going: torch.Tensor) -> torch.Tensor:
        """The going rows' values in a tensor of the decoder's batch (a fixed shape keeps every row; the others
        are run, unread)."""
        if len(rows) == decoder.cache.rows:
            return going
        full = torch.zeros((decoder.cache.rows, *going.shape[1:]), dtype=going.dtype, device=device)
        return full.index_copy(0, rows, going)

    logits = decoder.prefill(torch.tensor(draws.rows, device=device))  # [batch, vocab]
    for drawn in range(1, settings.text_size + 1):
        tokens = draws.draw(logits)  # [going], on the device
        last = drawn == settings.text_size
        # queued before the host reads the tokens; a full cache slides instead, once the host has them
        ahead = None if last or decoder.full else decoder.step(whole_batch(tokens))  # [decoder's batch, vocab]
        ended = set()
        for row, token in enumerate(draws.take()):
            if samples[owner[row]].push(token):
                ended.add(row)
            yield owner[row]
        if last or len(ended) == len(owner):
            return
        if ended:  # an ended sample leaves: it draws no more and feeds no penalty
            kept = [row for row in range(len(owner)) if row not in ended]
            draws.keep(kept)
            owner, rows = [owner[r] for r in kept], rows[torch.tensor(kept, device=device)]
        if ahead is not None:
            logits = ahead[rows]
        if ended and decoder.keep_rows(rows):
            rows = torch.arange(len(rows), device=device)
        if ahead is None:  # slide: the newest half of the text becomes the new prompt
            newest = torch.tensor([row[-(window // 2):] for row in draws.rows], device=device)
            logits = decoder.prefill(whole_batch(newest))[rows]


class TextStream:
    """Turns a growing list of generated ids into printable text pieces.

    Decodes prompt + continuation together (so the first word keeps its space) and holds back an incomplete
    character, so a half-decoded syllable is never printed.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.base = tokenizer.decode(self.prompt_ids)
        self.ids: list[int] = []
        self.text = ""  # the continuation printed so far

    def push(self, token: int) -> str:
        """Add one id; return the text that became printable."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.prompt_ids + self.ids)
        continuation = full[len(self.base):] if full.startswith(self.base) else self.tokenizer.decode(self.ids)
        continuation = continuation.rstrip("\ufffd")
        if not continuation.startswith(self.text):
            return ""
        new = continuation[len(self.text):]
        self.text = continuation
        return new


class StopText:
    """Cuts a continuation at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        else:
            end = max(self.shown, len(self.text) - self.hold)
        out, self.shown = self.text[self.shown:end], end
        return out

    def flush(self) -> str:
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


@dataclass(frozen=True)
class Piece:
    """New text of one sample, in the order it became printable. A sample's last piece has ``finish``: "stop" (end
    token, stop token or stop string) or "length" (``text_size`` reached)."""

    index: int
    text: str
    finish: str | None = None
    tokens: int = 0  # on the last piece: how many tokens the sample took (its end token not counted)

    @property
    def done(self) -> bool:
        return self.finish is not None


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


class SampleText:
    """One sample's text as its tokens come, and the one place its end is decided: the end token, a stop token
    (chat: the next turn's ``<usr>``), or a stop string. Each ``push`` leaves the text that became printable in
    ``piece`` (None when nothing did)."""

    def __init__(self, index: int, tokenizer: Tokenizer, prompt_ids: list[int], end_ids: set[int],
                 stops: tuple[str, ...], trim_start: bool, text_size: int) -> None:
        self.index, self.end_ids, self.text_size = index, end_ids, text_size
        self.text, self.stop = TextStream(tokenizer, prompt_ids), StopText(stops)
        self.started = not trim_start
        self.tokens = 0
        self.piece: Piece | None = None

    def push(self, token: int) -> bool:
        if token in self.end_ids:
            self.piece = self._piece(self.stop.flush(), "stop")
            return True
        self.tokens += 1
        shown = self.stop.push(self.text.push(token))
        if self.stop.stopped or self.tokens == self.text_size:
            self.piece = self._piece(shown + self.stop.flush(), "stop" if self.stop.stopped else "length")
            return True
        self.piece = self._piece(shown) if shown else None
        return False

    def _piece(self, text: str, finish: str | None = None) -> Piece | None:
        if not self.started:
            text = text.lstrip()  # all space before a trimmed start is dropped
            self.started = bool(text)
        return Piece(self.index, text, finish, self.tokens) if text or finish else None


class TextSampler:
    """Text from a prompt, piece by piece: end token, stop strings, never-generated ids and whole characters are
    all handled here, so every caller sees the same text for the same model, prompt, settings and seed."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, stop_ids: tuple[int, ...] = (),
                 trim_start: bool = False) -> None:
        """``stop_ids``: tokens that end a sample like the end token (chat: the next turn's ``<usr>``);
        ``trim_start``: a sample starts at its first non-space character (a chat answer after ``<sys>``)."""
        self.model, self.tokenizer = model, tokenizer
        self.suppress = never_generated(tokenizer)
        self.end_ids = {tokenizer.eos_id, *stop_ids}
        self.trim_start = trim_start
        self.device = next(model.parameters()).device

    def framed(self, prompt: str) -> tuple[list[int], int]:
        """The prompt's ids as every text was framed in training, after the start token (special tokens it writes,
        such as ``<s>``, read as tokens, as transformers' tokenizers read them); and how many start tokens were
        added for it (0 when it starts with one)."""
        ids = encode_with_special_tokens(self.tokenizer, prompt)
        added = int(not ids or ids[0] != self.tokenizer.bos_id)
        return [self.tokenizer.bos_id] * added + ids, added

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.framed(prompt)[0]

    def stream(self, prompt_ids: list[int], settings: SamplingSettings, seed: int,
               num_samples: int = 1) -> Iterator[Piece]:
        """Pieces of ``num_samples`` continuations drawn together; each sample ends with one ``done`` piece."""
        samples = self.sample_texts(prompt_ids, settings, num_samples)
        for index in generate_ids(self.model, prompt_ids, settings, samples, self.generator(seed), self.suppress):
            if samples[index].piece is not None:
                yield samples[index].piece

    def sample_texts(self, prompt_ids: list[int], settings: SamplingSettings, num_samples: int) -> list[SampleText]:
        """The texts of ``num_samples`` samples of ``prompt_ids``, each ending where this sampler's samples end."""
        return [SampleText(i, self.tokenizer, prompt_ids, self.end_ids, settings.stop, self.trim_start,
                           settings.text_size) for i in range(num_samples)]

    def generator(self, seed: int) -> torch.Generator:
        """The random generator a seed names: one per prompt, so its text depends on nothing else drawn."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def complete(self, prompt_ids: list[int], settings: SamplingSettings, seed: int, num_samples: int = 1) -> list[str]:
        """The whole continuation of each sample."""
        texts = [""] * num_samples
        for piece in self.stream(prompt_ids, settings, seed, num_samples):
            texts[piece.index] += piece.text
        return texts


def chat_sampler(model: GPT, chat: ChatFormat) -> TextSampler:
    """The engine for answers: one ends where the next turn's ``<usr>`` would start, and starts at its first word."""
    return TextSampler(model, chat.tokenizer, stop_ids=(chat.usr_id,), trim_start=True)


def fixed_sample(model: GPT, tokenizer: Tokenizer, phrase: str, chat: bool, seed: int) -> str:
    """The short text training prints at each evaluation: a continuation of ``phrase`` or, for a chat model, the
    answer to ``TRAINING_SAMPLE_QUESTION``, drawn with the run's seed on a generator of its own."""
    if chat:
        turns = ChatFormat(tokenizer)
        prompt = turns.prompt(TRAINING_SAMPLE_QUESTION, [], model.config.n_positions)
        return f"{TRAINING_SAMPLE_QUESTION} -> {chat_sampler(model, turns).complete(prompt, TRAINING_SAMPLE, seed)[0]}"
    sampler = TextSampler(model, tokenizer)
    return phrase + sampler.complete(sampler.prompt_ids(phrase), TRAINING_SAMPLE, seed)[0]
