"""The prompt loop: each prompt (typed, piped or from a file) turned into streamed, reproducible samples, with
``/settings`` commands between prompts; line editing on a terminal."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Callable, TextIO

from ..defaults import SamplingSettings
from ..errors import KoGPT2Error, WriteFailed
from .engine import TextSampler, new_seed
from .outputs import Sample

QUIT = {"", "quit", "exit", "q"}
HELP = """settings for the next prompts / 다음 입력부터 적용되는 설정:
  /temperature 0.8   /top_k 40   /top_p 0.95   /repetition_penalty 1.2   /no_repeat_ngram 3
  /text_size 300     /num_samples 3   /seed 7   /stop 다.   /settings (show)   /help
  empty line, quit or exit ends / 빈 줄, quit, exit 입력 시 종료"""


class PromptLoop:
    """Samples for one prompt at a time, printed as they are made; the settings can change between prompts."""

    help_text = HELP
    refused: dict[str, str] = {}  # settings that do nothing here, and why

    def __init__(self, sampler: TextSampler, settings: SamplingSettings, seed: int | None, num_samples: int = 1,
                 out: TextIO | None = None, accept: Callable[[str], bool] | None = None, retries: int = 10) -> None:
        """``accept``, when given, vets each sample (``--no_copy``): a refused one is drawn again with the next
        seed, up to ``retries`` times, and dropped if none passes."""
        self.sampler, self.settings, self.seed, self.num_samples = sampler, settings, seed, num_samples
        self.out = out or sys.stdout
        self.accept, self.retries = accept, retries

    def run(self, prompt: str, stream: bool = True) -> list[Sample]:
        """Samples for one prompt; with ``stream`` (and one sample) the text is printed as it is made."""
        seed = self.seed if self.seed is not None else new_seed()
        live = stream and self.num_samples == 1 and self.accept is None
        samples = self._draw(prompt, seed, self.num_samples, live)
        if self.accept is not None:
            samples = [self._redraw(sample) for sample in samples]
            dropped = sum(s is None for s in samples)
            samples = [s for s in samples if s is not None]
            if dropped:
                self._write(f"({dropped} sample(s) only repeated the training text after {self.retries} tries)\n")
        if stream and not live:
            for sample in samples:
                tag = f"[{sample.index + 1}/{sample.num_samples}] " if sample.num_samples > 1 else ""
                self._write(f"{tag}{sample.text}\n")
        return samples

    def _redraw(self, sample: Sample) -> Sample | None:
        """Draw this one sample again with the next seeds; it keeps its place among the prompt's samples."""
        for attempt in range(1, self.retries + 1):
            if self.accept(sample.text):
                return sample
            seed = (sample.seed + attempt) % 2**32
            again = self._draw(sample.prompt, seed, 1, live=False)[0]
            sample = Sample(sample.prompt, again.text, sample.index, sample.num_samples, seed, sample.settings)
        return sample if self.accept(sample.text) else None

    def _draw(self, prompt: str, seed: int, num_samples: int, live: bool) -> list[Sample]:
        if live:
            self._write(prompt)
        texts = [""] * num_samples
        for piece in self.sampler.stream(self.sampler.prompt_ids(prompt), self.settings, seed, num_samples):
            texts[piece.index] += piece.text
            if live:
                self._write(piece.text + ("\n" if piece.done else ""))
        return [Sample(prompt, prompt + text, index, num_samples, seed, self.settings)
                for index, text in enumerate(texts)]

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def command(self, line: str) -> str:
        """Apply ``/name value``; returns what to tell the user (the setting is unchanged if the value is bad)."""
        name, _, value = line[1:].strip().partition(" ")
        value = value.strip()
        if name in ("help", "?", ""):
            return self.help_text
        if name == "settings":
            return "\n".join(f"{key} = {_shown(value)}" for key, value in self.shown_settings().items())
        if name in self.refused:
            return f"/{name}: {self.refused[name]}"
        try:
            if name == "seed":
                self.seed = int(value)
            elif name == "num_samples":
                if int(value) < 1:
                    raise KoGPT2Error("must be at least 1")
                self.num_samples = int(value)
            elif name == "stop":
                self.settings = self.settings.with_value("stop", (value,) if value else ())
            else:
                kinds = {f.name: f.type for f in fields(SamplingSettings)}
                if name not in kinds:
                    return f"unknown setting /{name}; /help lists them"
                cast = float if kinds[name] == "float" else int
                self.settings = self.settings.with_value(name, cast(value))
        except ValueError:
            return f"/{name}: '{value}' is not a number"
        except KoGPT2Error as error:
            return f"/{name}: {error}"
        return f"{name} = {value}"

    def shown_settings(self) -> dict:
        """What ``/settings`` lists: every setting that acts here."""
        return {**self.settings.to_dict(), "num_samples": self.num_samples, "seed": self.seed}


def _shown(value) -> str:
    if value is None:
        return "random / 무작위"
    if isinstance(value, list):
        return " ".join(repr(stop) for stop in value) or "none / 없음"
    return str(value)


def line_editing() -> None:
    """Arrow keys edit the typed line and Up recalls earlier ones: importing the standard library's ``readline``
    (GNU readline or libedit) is what gives ``input()`` that, where the platform has it (not on Windows)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def prompts_from(first: str | None, interactive: bool, stdin: TextIO, ask: str = "input : "):
    """The first phrase, then one prompt per input line: asked with ``ask`` and line editing on a terminal, read
    as they come (empty lines skipped) from a pipe."""
    if first is not None:
        yield first
    while True:
        if interactive:
            try:
                yield input(ask)
            except EOFError:
                sys.stdout.write("\n")  # Ctrl-D: leave the shell's prompt on a line of its own
                return
            continue
        line = stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\r\n")


def settings_from(args: argparse.Namespace, base: SamplingSettings) -> SamplingSettings:
    """The sampling flags the user gave, over ``base`` (the CLI's defaults, or chat's)."""
    given = getattr(args, "given", None)
    return base.updated({f.name: getattr(args, f.name) for f in fields(SamplingSettings)
                         if f.name == "stop" or given is None or f.name in given})


def converse(loop: PromptLoop, first: str | None, loops: int, respond: Callable[[str], object],
             ask: str = "input : ") -> None:
    """Typed or piped prompts until quit, end of input, Ctrl-C or ``loops`` answers (-1: no limit); lines starting
    with "/" change settings. ``respond`` answers one prompt (text samples, or a chat answer)."""
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # invalid UTF-8 typed or piped in must not crash the loop
    interactive = stdin.isatty()
    if interactive:
        line_editing()
    done = 0
    try:
        for prompt in prompts_from(first, interactive, stdin, ask):
            if prompt.startswith("/"):
                print(loop.command(prompt))
                continue
            if interactive and prompt.strip().lower() in QUIT:
                break
            try:
                respond(prompt)
            except WriteFailed:  # its text was shown, but a file of it could not be written: stop, in one line
                raise
            except KoGPT2Error as error:  # this prompt cannot be answered (a question too long): the next may
                print(f"error: {error}", file=sys.stderr)
                continue
            done += 1
            if loops >= 0 and done >= loops:
                break
    except KeyboardInterrupt:
        print()
