"""OpenAI's ``logprobs`` object of a completion: each token's own text, where it starts in the choice's text, its
log-probability and the most likely alternatives at its place. Evaluation tools (lm-eval) read it to score text."""
from __future__ import annotations

from ..corpus.tokenizer import Tokenizer
from ..generation.batching import TokenScore
from ..generation.engine import TextStream

CONTEXT_FOR_ALTERNATIVES = 4  # tokens before an alternative that decide its text (a leading space, a whole syllable)


class TokenLogprobs:
    """The ``logprobs`` of one choice, built token by token: ``tokens`` joined give the choice's text from
    ``offset`` on (a token that ends half a character has "" and the next one the whole character)."""

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int], offset: int) -> None:
        self.tokenizer = tokenizer
        self.stream = TextStream(tokenizer, context_ids)
        self.context = list(context_ids)
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.taken = 0

    def add(self, score: TokenScore) -> None:
        text = self.stream.push(score.token)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        self.token_logprobs.append(score.logprob)
        self.top_logprobs.append(None if score.logprob is None else
                                 {self._text_of(token): value for token, value in score.top})
        self.context.append(score.token)

    def _text_of(self, token: int) -> str:
        """An alternative's text where it would have stood (after the tokens before this place)."""
        before = self.context[-CONTEXT_FOR_ALTERNATIVES:]
        shown = self.tokenizer.decode(before)
        text = self.tokenizer.decode(before + [token])
        return text[len(shown):] if text.startswith(shown) else self.tokenizer.decode([token])

    def whole(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}

    def new(self) -> dict | None:
        """The tokens added since the last call (a streamed chunk's), or None when there are none."""
        start, self.taken = self.taken, len(self.tokens)
        if start == self.taken:
            return None
        return {name: values[start:] for name, values in self.whole().items()}
