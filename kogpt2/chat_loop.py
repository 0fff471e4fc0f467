"""What ``generator.py`` does with a chat checkpoint (or ``--chat``): a conversation, each answer streamed as it is
made and ended by the end token; piped questions get one answer a line, a file of questions a table."""
from __future__ import annotations

import argparse

from .chat import ChatFormat
from .defaults import SamplingSettings
from .generate import new_seed
from .model import GPT
from .outputs import read_prompts, write_table
from .prompt_loop import PromptLoop, converse
from .tokenizer import Tokenizer

RESET_DONE = "history cleared / 대화 기록을 지웠습니다"


class ChatLoop(PromptLoop):
    """Answers one question at a time; with ``history`` > 0 the last turns are the context of the next answer."""

    def __init__(self, model: GPT, chat: ChatFormat, settings: SamplingSettings, seed: int | None,
                 history: int = 0, out=None) -> None:
        super().__init__(chat.sampler(model), settings, seed, out=out)
        self.model, self.chat, self.history_turns = model, chat, history
        self.history: list[tuple[str, str]] = []

    def answer(self, question: str, stream: bool = True) -> tuple[str, int]:
        """The answer (printed as it is made with ``stream``) and the seed it was drawn with."""
        seed = self.seed if self.seed is not None else new_seed()
        turns = self.history[-self.history_turns:] if self.history_turns else []
        prompt = self.chat.answer_prompt(question, turns, self.model, self.settings.text_size)
        text = ""
        for piece in self.sampler.stream(prompt, self.settings, seed):
            text += piece.text
            if stream:
                self._write(piece.text)
        text = text.rstrip()
        if stream:
            self._write("\n")
        if self.history_turns:
            self.history.append((question, text))
        return text, seed

    def command(self, line: str) -> str:
        if line.strip() == "/reset":
            self.history.clear()
            return RESET_DONE
        return super().command(line)


def run_chat(args: argparse.Namespace, model: GPT, tokenizer: Tokenizer, settings: SamplingSettings) -> None:
    loop = ChatLoop(model, ChatFormat(tokenizer), settings, args.seed, args.history)
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
