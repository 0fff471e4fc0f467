"""What ``generator.py`` does with a chat checkpoint (or ``--chat``): a conversation, each answer streamed as it is
made and ended by the end token; piped questions get one answer a line, a file of questions a table."""
from __future__ import annotations

import argparse
import sys

from .chat import ChatFormat, Turn, history_note, history_turns
from .defaults import SamplingSettings
from .generate import new_seed
from .loading import OpenedModel
from .model import GPT
from .outputs import read_prompts, write_table
from .prompt_loop import PromptLoop, converse

RESET_DONE = "history cleared / 대화 기록을 지웠습니다"
CHAT_HELP = """settings for the next answers / 다음 답부터 적용되는 설정:
  /temperature 0.8   /top_k 40   /top_p 0.95   /repetition_penalty 1.2   /no_repeat_ngram 3
  /text_size 64      /seed 7   /stop 다.   /settings (show)   /help
  /reset clears the history / 대화 기록 지우기
  empty line, quit or exit ends / 빈 줄, quit, exit 입력 시 종료"""


class ChatLoop(PromptLoop):
    """Answers one question at a time; with ``history`` > 0 the last turns are the context of the next answer."""

    help_text = CHAT_HELP
    refused = {"num_samples": "a chat draws one answer at a time / 대화는 답을 하나씩 만듭니다"}

    def __init__(self, model: GPT, chat: ChatFormat, settings: SamplingSettings, seed: int | None,
                 history: int = 0, out=None) -> None:
        super().__init__(chat.sampler(model), settings, seed, out=out)
        self.model, self.chat, self.history_turns = model, chat, history
        self.history: list[Turn] = []

    def answer(self, question: str, stream: bool = True) -> tuple[str, int]:
        """The answer (printed as it is made with ``stream``) and the seed it was drawn with."""
        seed = self.seed if self.seed is not None else new_seed()
        prompt, room = self.chat.answer_prompt(question, self.history, self.model, self.settings.text_size,
                                               self.history_turns)
        text = ""
        for piece in self.sampler.stream(prompt, self.settings.with_value("text_size", room), seed):
            text += piece.text
            if stream:
                self._write(piece.text)
        text = text.rstrip()
        if stream:
            self._write("\n")
        if self.history_turns:
            self.history = [*self.history, (question, text)][-self.history_turns:]
        return text, seed

    def shown_settings(self) -> dict:
        return {**self.settings.to_dict(), "history": self.history_turns, "seed": self.seed}

    def command(self, line: str) -> str:
        if line.strip() == "/reset":
            self.history.clear()
            return RESET_DONE
        return super().command(line)


def run_chat(args: argparse.Namespace, opened: OpenedModel, settings: SamplingSettings) -> None:
    turns = history_turns(opened.record, args.history)
    loop = ChatLoop(opened.model, ChatFormat(opened.tokenizer), settings, args.seed, turns)
    note = history_note(opened.record, turns)
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
