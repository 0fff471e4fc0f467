"""The HTTP API's request bodies (OpenAI's completions and chat completions, plus KoGPT2's own sampling fields),
checked by type and range before anything reaches the model. Fields OpenAI clients send and that change nothing
here (``user``, ``logprobs: false``) are accepted; a field that would change the answer and that this server does
not do (``best_of`` > 1, ``suffix``, chat ``logprobs``) is refused by name, never ignored."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..defaults import (MAX_LOGPROBS, MAX_PROMPT_CHARS, MAX_REPETITION_PENALTY, MAX_SAMPLES, MAX_STOP_STRINGS,
                        MAX_TOKENS, OPENAI_PENALTY)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=1 / MAX_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                             allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-OPENAI_PENALTY, le=OPENAI_PENALTY, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-OPENAI_PENALTY, le=OPENAI_PENALTY, allow_inf_nan=False)
    no_repeat_ngram: int | None = Field(None, ge=0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def not_too_many(cls, stop):
        """Up to ``MAX_STOP_STRINGS`` (OpenAI's 4 is too few for lm-eval, which sends a task's every stop string
        and the end token); a single string may be of any length."""
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def token_ids_and_range(cls, bias):
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys are token ids, not {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases are in [-100, 100], not {value}")
        return bias

    @model_validator(mode="before")
    @classmethod
    def no_tools(cls, body):
        """Tools, functions and structured output would change the answer and are not done here."""
        if isinstance(body, dict):
            for name in ("tools", "tool_choice", "functions", "function_call"):
                if body.get(name) not in (None, [], "none"):
                    raise ValueError(f"{name}: not supported by this model (plain text only)")
            if body.get("response_format") not in (None, {"type": "text"}):
                raise ValueError("response_format: only {\"type\": \"text\"} is supported by this model")
        return body

    @model_validator(mode="after")
    def stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self


TokenIds = list[int]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts:
            raise ValueError("give at least one prompt")
        for one in prompts:
            if isinstance(one, str) and len(one) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt may have at most {MAX_PROMPT_CHARS} characters")
            if isinstance(one, list) and not one:
                raise ValueError("a token-id prompt needs at least one token")
        return prompt

    @model_validator(mode="after")
    def supported(self):
        if self.best_of is not None and self.best_of != 1:
            raise ValueError("best_of: only 1 is supported (the n samples are all returned)")
        if self.suffix is not None:
            raise ValueError("suffix: insertion is not supported by a left-to-right model")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids, in OpenAI's order."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def text_parts(cls, content):
        """OpenAI's other form of content, a list of parts: its text parts joined by a space, any other refused."""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = repr(part.get("type")) if isinstance(part, dict) else type(part).__name__
                raise ValueError(f'only text parts ({{"type": "text", "text": ...}}) are read, not {kind}')
            texts.append(part["text"])
        return " ".join(texts)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False

    @model_validator(mode="after")
    def supported(self):
        if self.logprobs:
            raise ValueError("logprobs: not supported for chat; use /v1/completions with logprobs")
        if self.max_tokens == 0:
            raise ValueError("max_tokens: an answer needs at least 1 token")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first problem, in one line: where it is and what is wrong; and the field it names (OpenAI's ``param``)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    parts = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(parts) or "body"
    if first.get("type") == "missing":
        return f"{where}: this field is required", where
    if parts and parts[0] == "prompt" and first.get("type") != "value_error":
        return ("prompt: give a string, a list of strings, a list of token ids, or a list of those", "prompt")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if not parts:  # a check over the whole body names its field itself ("best_of: ...")
        return message, message.split(":")[0] if ":" in message else None
    return f"{where}: {message}", parts[0]
