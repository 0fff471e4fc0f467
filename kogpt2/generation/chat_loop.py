"""The chat loop: a conversation, each answer streamed as it is made and ended where the next turn would start, with
the history one rule keeps (``ChatFormat.answer_prompt``) and ``/reset``."""
from __future__ import annotations

from ..corpus.chat_format import ChatFormat, Turn
from ..defaults import SamplingSettings
from ..model.gpt import GPT
from .engine import chat_sampler, new_seed
from .prompt_loop import PromptLoop

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
        super().__init__(chat_sampler(model, chat), settings, seed, out=out)
        self.model, self.chat, self.history_turns = model, chat, history
        self.history: list[Turn] = []

    def answer(self, question: str, stream: bool = True) -> tuple[str, int]:
        """The answer (printed as it is made with ``stream``) and the seed it was drawn with."""
        seed = self.seed if self.seed is not None else new_seed()
        prompt, room = self.chat.answer_prompt(question, self.history, self.model.config.n_positions,
                                               self.settings.text_size, self.history_turns)
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
