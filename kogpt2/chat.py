"""Chat in the KoGPT2-chatbot layout: each question/answer row is one example, ``<usr>`` question ``<sys>`` answer
and the end token, tokenized as one text (so the ids are the tokenizer's own for that text); only the answer and
the end token are learnt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data import CsvFile
from .errors import KoGPT2Error
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .generate import TextSampler
    from .model import GPT

USR, SYS = "<usr>", "<sys>"


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.usr_id, self.sys_id = tokenizer.token_id(USR), tokenizer.token_id(SYS)
        if self.usr_id is None or self.sys_id is None:
            raise KoGPT2Error(f"this model's tokenizer has no {USR}/{SYS} tokens, so it cannot chat; use KoGPT2 "
                              "(v1 or v2) or a --pretrained scratch model trained with --chat")

    def example(self, question: str, answer: str) -> tuple[list[int], int]:
        """The example's ids and the index of its first answer token (its targets count from there)."""
        prompt = self.tokenizer.encode(USR + question + SYS)
        ids = self.tokenizer.encode(USR + question + SYS + answer) + [self.tokenizer.eos_id]
        if ids[:len(prompt)] != prompt:  # the tokenizer joined across <sys>: the answer starts after it
            return ids, ids.index(self.sys_id) + 1
        return ids, len(prompt)

    def sampler(self, model: GPT) -> TextSampler:
        """The engine for answers: one ends where the next turn's ``<usr>`` would start, and starts at its first
        word."""
        from .generate import TextSampler

        return TextSampler(model, self.tokenizer, stop_ids=(self.usr_id,), trim_start=True)

    def answer_prompt(self, question: str, history: list[tuple[str, str]], model: GPT, answer_tokens: int) -> list[int]:
        """The prompt for an answer of up to ``answer_tokens``, leaving it room in the model's window."""
        return self.prompt(question, history, max(1, model.config.n_positions - answer_tokens))

    def prompt(self, question: str, history: list[tuple[str, str]], window: int) -> list[int]:
        """Earlier turns (whole, with their end tokens) then the question, up to ``window`` tokens: the oldest turns
        go first, and a question longer than the window keeps its end."""
        ids = self.tokenizer.encode(USR + question + SYS)[-window:]
        for asked, answered in reversed(history):
            turn = self.example(asked, answered)[0]
            if len(turn) + len(ids) > window:
                break
            ids = turn + ids
        return ids


@dataclass
class ChatRows:
    questions: list[str]
    answers: list[str]
    rows_read: int
    rows_empty: int  # a question or an answer missing


def read_pairs(csv: CsvFile, question_column: str, answer_column: str) -> ChatRows:
    questions = csv.cells(csv.require(question_column, "--question_column"))
    answers = csv.cells(csv.require(answer_column, "--answer_column"))
    pairs = [(q, a) for q, a in zip(questions, answers) if q.strip() and a.strip()]
    if not pairs:
        raise KoGPT2Error(f"{csv.path}: no row has both a question ('{question_column}') and an answer "
                          f"('{answer_column}')")
    return ChatRows([q for q, _ in pairs], [a for _, a in pairs], len(questions), len(questions) - len(pairs))
