"""The HTTP API's request bodies (OpenAI's completions shape, plus KoGPT2's own sampling fields), checked by type
and range before anything reaches the model; unknown fields are ignored, as OpenAI clients send several."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..defaults import MAX_SAMPLES, MAX_TOKENS


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # the one model served; any name is accepted
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    no_repeat_ngram: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, max_length=16)
    stream: bool = False


class CompletionRequest(SamplingFields):
    prompt: str = Field(max_length=100_000)


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


def validation_message(errors: list[dict]) -> str:
    """The first problem, in one line: where it is and what is wrong."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    if first.get("type") == "missing":
        return f"{where}: this field is required"
    return f"{where}: {first.get('msg', 'invalid value')}"
