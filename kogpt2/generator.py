"""What ``generator.py`` does: open a model, then answer prompts (typed, piped or from a file) with streamed,
reproducible samples, or open a chat for a chatbot's checkpoint, or serve both over HTTP (``--serve``)."""
from __future__ import annotations

import argparse
import sys

from .corpus.chat_format import ChatFormat, history_note, history_turns
from .defaults import CHAT_SAMPLING, SAMPLING, SamplingSettings
from .generation.chat_loop import ChatLoop
from .generation.copy_report import copy_check, training_text_for, write_report
from .generation.engine import TextSampler
from .generation.outputs import Sample, read_prompts, save_sample_file, write_rows, write_table
from .generation.prompt_loop import PromptLoop, converse, settings_from
from .runtime import pick_device, pick_precision
from .serve.server import serve, serve_options
from .store.opening import OpenedModel, open_model


def run(args: argparse.Namespace) -> int:
    serving = serve_options(args) if args.serve else None  # its key is checked before a model is opened
    device = pick_device(args.device)
    opened = open_model(args.load_path, args.pretrained, device, pick_precision(args.dtype, device))
    opened.model.eval()
    if serving:
        serve(opened, serving)
        return 0
    if args.chat or opened.chat:
        _chat(args, opened, settings_from(args, CHAT_SAMPLING))
        return 0
    settings = settings_from(args, SAMPLING)
    training = training_text_for(opened.record, args.data_file_path, args.column, opened.tokenizer, args.format,
                                 args.txt_unit) if args.report or args.no_copy else None
    loop = PromptLoop(TextSampler(opened.model, opened.tokenizer), settings, args.seed, args.num_samples,
                      accept=copy_check(training, args.copy_words) if args.no_copy else None)
    produced = (_batch if args.prompts else _conversation)(args, loop, opened.source)
    if args.report:
        write_report(args.report, produced, training, opened.source)
    return 0


def _batch(args: argparse.Namespace, loop: PromptLoop, source: str) -> list[Sample]:
    prompts = read_prompts(args.prompts, args.column, args.encoding)
    samples = [s for prompt in prompts for s in loop.run(prompt, stream=not args.output)]
    if args.output:
        write_rows(args.output, samples, source)
        print(f"{len(samples)} samples written to {args.output}")
    return samples


def _conversation(args: argparse.Namespace, loop: PromptLoop, source: str) -> list[Sample]:
    produced: list[Sample] = []

    def respond(prompt: str) -> None:
        for sample in loop.run(prompt):
            produced.append(sample)
            if args.samples:
                save_sample_file(args.samples, sample, source)

    converse(loop, args.tmp_sent, args.loops, respond)
    return produced


def _chat(args: argparse.Namespace, opened: OpenedModel, settings: SamplingSettings) -> None:
    turns = history_turns(opened.chat_turns, args.history)
    loop = ChatLoop(opened.model, ChatFormat(opened.tokenizer), settings, args.seed, turns)
    note = history_note(opened.chat_turns, turns)
    if note:
        print(note, file=sys.stderr)
    if args.prompts:
        rows = []
        for question in read_prompts(args.prompts, args.question_column, args.encoding):
            answer, seed = loop.answer(question, stream=not args.output)
            rows.append({"Q": question, "A": answer, **settings.to_dict(), "seed": seed})
        if args.output:
            write_table(args.output, rows)
            print(f"{len(rows)} answers written to {args.output}")
        return
    converse(loop, args.tmp_sent, args.loops, loop.answer, ask="user > ")
