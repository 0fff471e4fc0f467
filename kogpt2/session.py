"""What ``generator.py`` does: load a model, then turn prompts into streamed, reproducible samples."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, TextIO

import torch

from .checkpoint import is_ours, load_checkpoint, model_from_checkpoint
from .errors import KoGPT2Error
from .runtime import pick_device
from .generate import SamplingSettings, TextStream, generate_ids, never_generated
from .model import GPT
from .pretrained import load_pretrained, load_pretrained_tokenizer
from .report import TrainingText, normalise, summarise, training_text_from
from .tokenizer import Tokenizer

QUIT = {"", "quit", "exit", "q"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HELP = """settings for the next prompts / 다음 입력부터 적용되는 설정:
  /temperature 0.8   /top_k 40   /top_p 0.95   /repetition_penalty 1.2   /no_repeat_ngram 3
  /text_size 300     /num_samples 3   /seed 7   /settings (show)   /help
  empty line, quit or exit ends / 빈 줄, quit, exit 입력 시 종료"""


@dataclass
class Sample:
    prompt: str
    text: str
    index: int
    num_samples: int
    seed: int
    settings: SamplingSettings


def load_model(load_path: str | None, pretrained: str, device: torch.device, dtype: str) -> tuple[GPT, Tokenizer, str, dict]:
    """Our checkpoints are self-contained; a 2020 checkpoint takes its v1 tokenizer from ``pretrained``.
    Returns the model, its tokenizer, where they came from, and the checkpoint's record of its training data."""
    if load_path:
        path = Path(load_path)
        if not path.is_file():
            raise KoGPT2Error(f"--load_path {path}: no such checkpoint file")
        payload = load_checkpoint(path)
        tokenizer = None if is_ours(payload) else load_pretrained_tokenizer(pretrained)
        model, tokenizer = model_from_checkpoint(payload, path, tokenizer)
        source, record = str(path), {"data": payload.get("data", {}), "args": payload.get("args", {})}
    else:
        model, tokenizer = load_pretrained(pretrained)
        source, record = pretrained, {}
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), tokenizer, source, record


class StopText:
    """Cuts a continuation at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
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


class Generator:
    def __init__(self, model: GPT, tokenizer: Tokenizer, settings: SamplingSettings, seed: int | None,
                 num_samples: int = 1, out: TextIO | None = None, accept: Callable[[str], bool] | None = None,
                 retries: int = 10) -> None:
        """``accept``, when given, vets each sample (``--no_copy``): a refused one is drawn again with the next
        seed, up to ``retries`` times, and dropped if none passes."""
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.seed = seed
        self.num_samples = num_samples
        self.out = out or sys.stdout
        self.accept, self.retries = accept, retries
        self.device = next(model.parameters()).device

    def run(self, prompt: str, stream: bool = True) -> list[Sample]:
        """Samples for one prompt; with ``stream`` (and one sample) the text is printed as it is made."""
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
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
                tag = f"[{sample.index + 1}/{sample.num_samples}] " if self.num_samples > 1 else ""
                self._write(f"{tag}{sample.text}\n")
        return samples

    def _redraw(self, sample: Sample) -> Sample | None:
        for attempt in range(1, self.retries + 1):
            if self.accept(sample.text):
                return sample
            sample = self._draw(sample.prompt, (sample.seed + attempt) % 2**32, 1, live=False)[0]
        return sample if self.accept(sample.text) else None

    def _draw(self, prompt: str, seed: int, num_samples: int, live: bool) -> list[Sample]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        prompt_ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        streams = [TextStream(self.tokenizer, prompt_ids) for _ in range(num_samples)]
        stops = [StopText(self.settings.stop) for _ in range(num_samples)]
        if live:
            self._write(prompt)
        for step in generate_ids(self.model, prompt_ids, self.settings, self.tokenizer.eos_id, num_samples, generator,
                                 never_generated(self.tokenizer)):
            for token, text_stream, stop in zip(step, streams, stops):
                if token is not None and not stop.stopped:
                    shown = stop.push(text_stream.push(token))
                    if live:
                        self._write(shown)
            if all(s.stopped for s in stops):
                break
        samples = []
        for index, stop in enumerate(stops):
            rest = stop.flush()
            if live:
                self._write(rest + "\n")
            samples.append(Sample(prompt, prompt + stop.text, index, num_samples, seed, self.settings))
        return samples

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def command(self, line: str) -> str:
        """Apply ``/name value``; returns what to tell the user."""
        name, _, value = line[1:].strip().partition(" ")
        if name in ("help", "?", ""):
            return HELP
        if name == "settings":
            return f"{self.settings.to_dict()} num_samples={self.num_samples} seed={self.seed}"
        try:
            if name == "seed":
                self.seed = int(value)
            elif name == "num_samples":
                self.num_samples = max(1, int(value))
            elif name == "stop":
                self.settings = replace(self.settings, stop=[value] if value else [])
            else:
                kinds = {f.name: f.type for f in fields(SamplingSettings)}
                if name not in kinds:
                    return f"unknown setting /{name}; /help lists them"
                cast = float if kinds[name] == "float" else int
                self.settings = replace(self.settings, **{name: cast(value)})
        except (ValueError, KoGPT2Error) as error:
            return f"/{name}: {error}"
        return f"{name} = {value}"


def read_prompts(path: str, column: str) -> list[str]:
    """One prompt a line, or a CSV's column."""
    if path.endswith(".csv"):
        from .data import read_text_column

        return read_text_column(path, column).texts
    try:
        return [line for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise KoGPT2Error(f"cannot read prompts from {path}: {error}") from None


def write_rows(path: str, samples: list[Sample], source: str) -> None:
    """CSV as UTF-8 with BOM (Excel shows Korean right) or JSONL; every row carries what regenerates it."""
    rows = [{"prompt": s.prompt, "text": s.text, "sample_index": s.index, "num_samples": s.num_samples,
             "seed": s.seed, "checkpoint": source, **{k: v for k, v in s.settings.to_dict().items() if k != "stop"},
             "stop": json.dumps(s.settings.stop, ensure_ascii=False)} for s in samples]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".jsonl":
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        with target.open("w", encoding="utf-8-sig", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["prompt", "text"])
            writer.writeheader()
            writer.writerows(rows)


def save_sample_file(folder: str, sample: Sample, source: str) -> Path:
    """Like the original: one file per result, its first line the checkpoint, prompt and settings."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    header = {"checkpoint": source, "prompt": sample.prompt, "seed": sample.seed, "sample": sample.index,
              **sample.settings.to_dict()}
    path = target / f"sample_{time.strftime('%Y%m%d_%H%M%S')}_{time.monotonic_ns() % 10**9:09d}.txt"
    path.write_text(json.dumps(header, ensure_ascii=False) + "\n" + sample.text + "\n", encoding="utf-8")
    return path


def prompts_from(first: str | None, interactive: bool, stdin: TextIO):
    """The first phrase, then one prompt per input line (asking ``input : `` only on a terminal)."""
    if first is not None:
        yield first
    while True:
        if interactive:
            sys.stdout.write("input : ")
            sys.stdout.flush()
        line = stdin.readline()
        if not line:
            return
        line = line.rstrip("\r\n")
        if not interactive and not line.strip():
            continue
        yield line


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    model, tokenizer, source, record = load_model(args.load_path, args.pretrained, device, args.dtype)
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, no_repeat_ngram=args.no_repeat_ngram,
                                text_size=args.text_size, stop=list(args.stop or []))
    training = None
    if args.report or args.no_copy:
        training = training_text_from(record, args.data_file_path, "sent", tokenizer)

    def new_text(text: str) -> bool:
        return not training.is_copy(text) and training.words.longest_shared(normalise(text).split(" ")) <= args.copy_words

    generator = Generator(model, tokenizer, settings, args.seed, args.num_samples,
                          accept=new_text if args.no_copy else None)
    produced = (_batch if args.prompts else _conversation)(args, generator, source)
    if args.report:
        write_report(args.report, produced, training, source)
    return 0


def _batch(args: argparse.Namespace, generator: Generator, source: str) -> list[Sample]:
    samples = [s for prompt in read_prompts(args.prompts, args.column) for s in generator.run(prompt, stream=not args.output)]
    if args.output:
        write_rows(args.output, samples, source)
        print(f"{len(samples)} samples written to {args.output}")
    return samples


def _conversation(args: argparse.Namespace, generator: Generator, source: str) -> list[Sample]:
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # invalid UTF-8 typed or piped in must not crash the loop
    interactive = stdin.isatty()
    produced: list[Sample] = []
    done = 0
    try:
        for prompt in prompts_from(args.tmp_sent, interactive, stdin):
            if prompt.startswith("/"):
                print(generator.command(prompt))
                continue
            if interactive and prompt.strip().lower() in QUIT:
                break
            for sample in generator.run(prompt):
                produced.append(sample)
                if args.samples:
                    save_sample_file(args.samples, sample, source)
            done += 1
            if args.loops >= 0 and done >= args.loops:
                break
    except KeyboardInterrupt:
        print()
    return produced


def write_report(path: str, samples: list[Sample], training: TrainingText, source: str) -> None:
    """Per sample: copy or not, longest run shared with the training text (words, tokens); then averages and
    distinct-1/2 over all samples."""
    rows = [{"prompt": s.prompt, "text": s.text, "seed": s.seed, "sample_index": s.index, **training.measure(s.text)}
            for s in samples]
    summary = summarise(rows)
    report = {"checkpoint": source, "settings": samples[0].settings.to_dict() if samples else {},
              "summary": summary, "samples": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"report: {summary['samples']} samples, copy rate {summary['copy_rate']:.2f}, longest shared run "
          f"{summary['mean_longest_shared_words']:.1f} words on average, distinct-1 {summary['distinct_1']:.2f}, "
          f"distinct-2 {summary['distinct_2']:.2f} -> {path}")
