"""Chat in the KoGPT2-chatbot layout: each question/answer turn is ``<usr>`` question ``<sys>`` answer and the end
token, tokenized as one text (so the ids are the tokenizer's own for that text); only answers and end tokens are
learnt. A row is a dialogue of one turn, unless a dialogue column groups consecutive rows into one dialogue, whose
turns are then learnt one after another in one context.

The one history rule lives here too (``Conversation``, ``ChatFormat.answer_prompt``): the CLI, the web page and the
API all answer from the question and the same earlier turns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

from ..errors import KoGPT2Error
from ..model.head_loss import IGNORE_INDEX
from .reading import CsvFile
from .tokenizer import Tokenizer

USR, SYS = "<usr>", "<sys>"
SYSTEM_ROLES = ("system", "developer")
Turn = tuple[str, str]  # (question, answer)


class ChatExample(NamedTuple):
    ids: list[int]
    targets: list[int]  # ids[1:], IGNORE_INDEX where nothing is learnt (questions)
    turns: int


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.usr_id, self.sys_id = tokenizer.token_id(USR), tokenizer.token_id(SYS)
        if self.usr_id is None or self.sys_id is None:
            raise KoGPT2Error(f"this model's tokenizer has no {USR}/{SYS} tokens, so it cannot chat; use KoGPT2 "
                              "(v1 or v2) or a --pretrained scratch model trained with --chat")

    def example(self, question: str, answer: str) -> tuple[list[int], int]:
        """One turn's ids and the index of its first answer token (its targets count from there)."""
        prompt = self.tokenizer.encode(USR + question + SYS)
        ids = self.tokenizer.encode(USR + question + SYS + answer) + [self.tokenizer.eos_id]
        if ids[:len(prompt)] != prompt:  # the tokenizer joined across <sys>: the answer starts after it
            return ids, ids.index(self.sys_id) + 1
        return ids, len(prompt)

    def dialogue(self, turns: list[Turn], block_size: int) -> list[ChatExample]:
        """Training examples of one dialogue: its turns back to back, as many as fit in ``block_size`` inputs (the
        next example starts at a turn, as a chat's history loses its oldest turns first), every answer learnt with
        the turns before it as context. A turn longer than a block is an example of its own (cut when packed)."""
        examples: list[ChatExample] = []
        ids: list[int] = []
        learnt: list[bool] = []
        count = 0
        for question, answer in turns:
            turn, start = self.example(question, answer)
            if ids and len(ids) + len(turn) - 1 > block_size:
                examples.append(_example(ids, learnt, count))
                ids, learnt, count = [], [], 0
            ids += turn
            learnt += [i >= start for i in range(len(turn))]
            count += 1
        examples.append(_example(ids, learnt, count))
        return examples

    def answer_prompt(self, question: str, history: list[Turn], window: int, answer_tokens: int,
                      turns: int) -> tuple[list[int], int]:
        """The prompt and the answer's most tokens, by the one rule the CLI, the page and the API share: the question
        is kept whole (one that leaves no room for an answer is refused), the answer gets up to ``answer_tokens`` of
        what the ``window`` (the model's positions) leaves, and the last ``turns`` earlier turns fill the rest, the
        oldest left out first."""
        asked = len(self.tokenizer.encode(USR + question + SYS))
        if asked >= window:
            raise KoGPT2Error(f"the question is {asked} tokens and this model's window is {window}, which leaves no "
                              "room for an answer; ask a shorter question")
        answer_tokens = min(answer_tokens, window - asked)
        return self.prompt(question, history[-turns:] if turns > 0 else [], window - answer_tokens), answer_tokens

    def prompt(self, question: str, history: list[Turn], window: int) -> list[int]:
        """Earlier turns (whole, with their end tokens) then the question: as many of the newest turns as fit with
        the question in ``window`` tokens. The question itself is never cut."""
        ids = self.tokenizer.encode(USR + question + SYS)
        for asked, answered in reversed(history):
            turn = self.example(asked, answered)[0]
            if len(turn) + len(ids) > window:
                break
            ids = turn + ids
        return ids


def _example(ids: list[int], learnt: list[bool], turns: int) -> ChatExample:
    return ChatExample(ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], learnt[1:])], turns)


@dataclass(frozen=True)
class Conversation:
    history: list[Turn]  # earlier (question, answer) turns, oldest first
    question: str
    system_messages: int  # system/developer messages left out

    @property
    def note(self) -> str | None:
        """What the API's response says when system/developer messages were left out."""
        if not self.system_messages:
            return None
        return (f"{self.system_messages} system/developer message(s) left out: this model learnt from "
                "question/answer turns only")


def conversation(messages: Iterable[tuple[str, str]]) -> Conversation:
    """(role, text) messages paired by role, not by position: consecutive messages of one role are one message
    (joined by a space), an assistant message with no question before it is a turn whose question is empty, and
    system/developer messages are left out (a model trained on question/answer turns has no place for them)."""
    merged: list[list[str]] = []
    system = 0
    for role, text in messages:
        if role in SYSTEM_ROLES:
            system += 1
        elif merged and merged[-1][0] == role:
            merged[-1][1] += " " + text
        else:
            merged.append([role, text])
    if not merged or merged[-1][0] != "user":
        raise KoGPT2Error("messages must end with a user message (the question to answer)")
    history, question = [], ""
    for role, text in merged[:-1]:
        if role == "user":
            question = text
        else:
            history.append((question, text))
            question = ""
    return Conversation(history, merged[-1][1], system)


def history_turns(trained_turns: int, requested: int | None) -> int:
    """Earlier turns kept as context: ``requested`` (``--history``), else as many as the model learnt to use
    (``trained_turns``: the most turns in one of its training examples, its record's ``chat_turns``)."""
    return requested if requested is not None else trained_turns - 1


def history_note(trained_turns: int, turns: int) -> str | None:
    """One line when ``turns`` earlier turns are more than the model ever saw before a question."""
    seen = trained_turns - 1
    if turns <= seen:
        return None
    if seen == 0:
        return (f"note: this model learnt from single question/answer pairs, never with earlier turns before a "
                f"question, so a history of {turns} turns makes its answers worse, not better (train on dialogues "
                "with --dialogue_column for history that helps)")
    return f"note: this model learnt with at most {seen} earlier turns; the ones before those are new to it"


@dataclass
class ChatRows:
    dialogues: list[list[Turn]]  # a question/answer row alone is a dialogue of one turn
    rows_read: int
    rows_empty: int  # a question or an answer missing


def read_pairs(csv: CsvFile, question_column: str, answer_column: str,
               dialogue_column: str | None = None) -> ChatRows:
    """The question/answer rows; with ``dialogue_column``, consecutive rows with the same (non-empty) value in it
    are the turns of one dialogue."""
    questions = csv.cells(csv.require(question_column, "--question_column"))
    answers = csv.cells(csv.require(answer_column, "--answer_column"))
    ids = csv.cells(csv.require(dialogue_column, "--dialogue_column")) if dialogue_column else [""] * len(questions)
    dialogues: list[list[Turn]] = []
    last = None
    for q, a, dialogue in zip(questions, answers, ids):
        if not (q.strip() and a.strip()):
            continue
        dialogue = dialogue.strip()
        if dialogue and dialogue == last:
            dialogues[-1].append((q, a))
        else:
            dialogues.append([(q, a)])
        last = dialogue
    if not dialogues:
        raise KoGPT2Error(f"{csv.path}: no row has both a question ('{question_column}') and an answer "
                          f"('{answer_column}')")
    turns = sum(len(d) for d in dialogues)
    return ChatRows(dialogues, len(questions), len(questions) - turns)
