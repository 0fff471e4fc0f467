"""The sampling engine: autoregressive decoding with the KV cache (one token of work per step), turned into text
pieces per sample. It never prints; the prompt loop, training samples, chat and the server all read its pieces."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .decoding_step import DecodingStep, GraphStep
from .defaults import TRAINING_SAMPLE, TRAINING_SAMPLE_QUESTION, SamplingSettings
from .errors import KoGPT2Error
from .kv_cache import KVCache, StaticKVCache
from .model import GPT
from .sampling import apply_repetition_penalty, block_repeated_ngrams, sample_next
from .tokenizer import Tokenizer


def never_generated(tokenizer: Tokenizer) -> list[int]:
    """Tokens that only ever mean noise in output: unknown, padding, and a start token distinct from the end."""
    return sorted({tokenizer.unk_id, tokenizer.pad_id} | ({tokenizer.bos_id} - {tokenizer.eos_id}))


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], settings: SamplingSettings, eos_id: int, num_samples: int = 1,
                 rng: torch.Generator | None = None, suppress: list[int] = (),
                 static: bool | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each sample (None once a sample has ended at ``eos_id``).

    ``suppress`` lists token ids never to produce (see ``never_generated``). ``static`` (default: on CUDA) decodes
    with fixed-shape steps replayed as a CUDA graph; the tokens are the same either way. Sampling stays on the
    device; the one host sync per token is reading the new tokens. Past the model's positions the context slides:
    the cache is rebuilt from the newest half of the text.
    """
    if not prompt_ids:
        raise KoGPT2Error("a prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    static = device.type == "cuda" if static is None else static
    window = model.config.n_positions
    keep = window // 2
    rows = [list(prompt_ids[-window:]) for _ in range(num_samples)]
    seen = torch.tensor(rows, device=device)  # prompt and new tokens, for the repetition penalty
    blocked = torch.tensor(list(suppress), dtype=torch.long, device=device)
    cache = (StaticKVCache if static else KVCache)(model.config, num_samples, window, device, dtype)
    prompt_step = DecodingStep(model, num_samples)
    graph_step = GraphStep(model, cache, num_samples, capture=device.type == "cuda") if static else None

    def prefill(ids: torch.Tensor) -> torch.Tensor:
        """Logits after a whole prompt, written into the cache from its first slot."""
        cache.restart()
        logits = prompt_step(ids, cache)
        if static:
            cache.start_decoding()
        return logits

    logits = prefill(seen)
    done = [False] * num_samples
    for _ in range(settings.text_size):
        if settings.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        logits = block_repeated_ngrams(logits, rows, settings.no_repeat_ngram)
        if len(blocked):
            logits = logits.index_fill(1, blocked, float("-inf"))
        tokens = sample_next(logits, settings.temperature, settings.top_k, settings.top_p, rng)
        chosen = tokens.tolist()
        step = []
        for i, token in enumerate(chosen):
            if done[i]:
                step.append(None)
                continue
            done[i] = token == eos_id
            step.append(None if done[i] else token)
        yield step
        if all(done):
            return
        for row, token in zip(rows, chosen):
            row.append(token)
        if settings.repetition_penalty != 1.0:
            seen = torch.cat([seen, tokens.view(-1, 1)], dim=1)
        if cache.length == window:  # slide: the newest half of the text becomes the new prompt
            logits = prefill(torch.tensor([row[-keep:] for row in rows], device=device))
        elif static:
            logits = graph_step(tokens)
        else:
            logits = prompt_step(tokens.view(-1, 1), cache)

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


class TextSampler:
    """Text from a prompt, piece by piece: end token, stop strings, never-generated ids and whole characters are
    all handled here, so every caller sees the same text for the same model, prompt, settings and seed."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, stop_ids: tuple[int, ...] = (),
                 trim_start: bool = False) -> None:
        """``stop_ids``: tokens that end a sample like the end token (chat: the next turn's ``<usr>``);
        ``trim_start``: a sample starts at its first non-space character (a chat answer after ``<sys>``)."""
        self.model, self.tokenizer = model, tokenizer
        self.suppress = never_generated(tokenizer)
        self.stop_ids = set(stop_ids)
        self.trim_start = trim_start
        self.device = next(model.parameters()).device

    def prompt_ids(self, prompt: str) -> list[int]:
        """The start token, then the prompt: how every text was framed in training."""
        return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)

    def stream(self, prompt_ids: list[int], settings: SamplingSettings, seed: int,
               num_samples: int = 1) -> Iterator[Piece]:
        """Pieces of ``num_samples`` continuations drawn together; each sample ends with one ``done`` piece."""
        rng = torch.Generator(device=self.device).manual_seed(seed)
        streams = [TextStream(self.tokenizer, prompt_ids) for _ in range(num_samples)]
        stops = [StopText(settings.stop) for _ in range(num_samples)]
        counts = [0] * num_samples
        started = [not self.trim_start] * num_samples
        ended = [False] * num_samples

        def piece(index: int, text: str, finish: str | None = None) -> Piece:
            if not started[index]:
                text = text.lstrip()
                started[index] = bool(text)
            return Piece(index, text, finish, counts[index])

        for step in generate_ids(self.model, prompt_ids, settings, self.tokenizer.eos_id, num_samples, rng,
                                 self.suppress):
            for index, token in enumerate(step):
                if ended[index]:
                    continue
                if token is None or token in self.stop_ids:
                    ended[index] = True
                    yield piece(index, stops[index].flush(), "stop")
                    continue
                counts[index] += 1
                shown = stops[index].push(streams[index].push(token))
                if stops[index].stopped:
                    ended[index] = True
                    yield piece(index, shown + stops[index].flush(), "stop")
                elif shown:
                    out = piece(index, shown)
                    if out.text:  # all space before a trimmed start
                        yield out
            if all(ended):
                return
        for index in range(num_samples):
            if not ended[index]:
                yield piece(index, stops[index].flush(), "length")

    def complete(self, prompt_ids: list[int], settings: SamplingSettings, seed: int, num_samples: int = 1) -> list[str]:
        """The whole continuation of each sample."""
        texts = [""] * num_samples
        for piece in self.stream(prompt_ids, settings, seed, num_samples):
            texts[piece.index] += piece.text
        return texts


def fixed_sample(model: GPT, tokenizer: Tokenizer, phrase: str, chat: bool, seed: int) -> str:
    """The short text training prints at each evaluation: a continuation of ``phrase`` or, for a chat model, the
    answer to ``TRAINING_SAMPLE_QUESTION``, drawn with the run's seed on a generator of its own."""
    from .chat import ChatFormat

    if chat:
        turns = ChatFormat(tokenizer)
        prompt = turns.prompt(TRAINING_SAMPLE_QUESTION, [], model.config.n_positions)
        return f"{TRAINING_SAMPLE_QUESTION} -> {turns.sampler(model).complete(prompt, TRAINING_SAMPLE, seed)[0]}"
    sampler = TextSampler(model, tokenizer)
    return phrase + sampler.complete(sampler.prompt_ids(phrase), TRAINING_SAMPLE, seed)[0]
