"""The one way to open a model: a checkpoint (ours or 2020's), a file main.py or the exporter wrote, a hub id, a
Hugging Face folder, or the v1 release files. Every CLI (training, generation, evaluation, export) comes here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..corpus.tokenizer import Tokenizer, load_tokenizer
from ..defaults import PRETRAINED
from ..errors import KoGPT2Error
from ..model.gpt import GPT, GPTConfig
from ..model.hf_layout import infer_config, load_hf_state_dict
from .checkpoint import CheckpointRecord, find_checkpoint, load_checkpoint, read_record, tokenizer_of, weights_of
from .pretrained import load_weights, locate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OpenedModel:
    model: GPT
    tokenizer: Tokenizer
    source: str  # what it was opened from, for messages and output files
    record: CheckpointRecord | None  # None: a pretrained release, not a checkpoint

    @property
    def chat(self) -> bool:
        return self.record is not None and self.record.chat

    @property
    def chat_turns(self) -> int:
        """The most turns the model saw in one training example (1: question/answer pairs, or no checkpoint)."""
        return self.record.chat_turns if self.record is not None else 1


def model_from_weights(state: dict[str, torch.Tensor], config: GPTConfig, tokenizer: Tokenizer, source: str) -> GPT:
    """A GPT with these weights, after checking that they fit the tokenizer (the classic v1/v2 mix-up)."""
    if config.vocab_size != tokenizer.vocab_size:
        raise KoGPT2Error(
            f"{source}: the weights have a vocabulary of {config.vocab_size} tokens but the tokenizer has "
            f"{tokenizer.vocab_size} (v1 weights need the v1 SentencePiece tokenizer, v2 weights the v2 tokenizer.json)")
    model = GPT(config)
    try:
        load_hf_state_dict(model, state)
    except KoGPT2Error as error:
        raise KoGPT2Error(f"{source}: {error}") from None
    return model


def load_pretrained(source: str = PRETRAINED, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """A model (eval mode) and its tokenizer from a hub id, an HF-layout directory or a directory of v1 files."""
    files = locate(source)
    tokenizer = load_tokenizer(files.tokenizer)
    state = load_weights(files.weights)
    config = files.config or infer_config(state, activation="gelu")  # v1 was trained with the exact erf GELU
    return model_from_weights(state, config, tokenizer, str(files.weights)).to(device).eval(), tokenizer


def load_pretrained_tokenizer(source: str) -> Tokenizer:
    """Only the tokenizer of a release (a 2020 checkpoint brings its own weights)."""
    return load_tokenizer(locate(source, with_weights=False).tokenizer)


def model_from_checkpoint(payload: dict, record: CheckpointRecord,
                          tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer a checkpoint holds. A 2020 checkpoint has no tokenizer: ``tokenizer`` (v1) is used."""
    state = weights_of(payload)
    if record.ours:
        config = GPTConfig.from_dict(record.config)
        tokenizer = tokenizer_of(payload)
    else:
        if tokenizer is None:
            raise KoGPT2Error(f"{record.path} is a 2020-format checkpoint with no tokenizer inside; "
                              "give the v1 files with --pretrained DIR (*.params + *.spiece)")
        try:
            config = infer_config(state, activation="gelu")
        except KeyError as error:
            raise KoGPT2Error(f"{record.path}: model_state_dict lacks {error}") from None
    return model_from_weights(state, config, tokenizer, str(record.path)), tokenizer


def is_model_file(source: str) -> bool:
    """A ``.tar`` that main.py or ``kogpt2.export`` wrote (or a 2020 checkpoint), as opposed to a release."""
    return Path(source).expanduser().is_file()


def open_checkpoint(path: Path, pretrained: str) -> OpenedModel:
    """A checkpoint file (ours, a 2020 one with ``pretrained``'s v1 tokenizer, or an exported one)."""
    payload = load_checkpoint(path)
    record = read_record(payload, path)
    model, tokenizer = model_from_checkpoint(payload, record, None if record.ours else load_pretrained_tokenizer(pretrained))
    return OpenedModel(model, tokenizer, str(path), record)


def open_model(load_path: str | None, pretrained: str = PRETRAINED, device: torch.device | str = "cpu",
               dtype: str | None = None) -> OpenedModel:
    """``load_path`` (a checkpoint, or a folder: its best, else newest, checkpoint) if given, else ``pretrained``: a
    release or any model file we wrote. ``dtype`` (fp32, bf16, fp16) casts the weights; None keeps them as stored."""
    if load_path:
        path = find_checkpoint(load_path, prefer_best=True)
        if path is None:
            raise KoGPT2Error(f"--load_path {load_path}: the folder has no checkpoint (KoGPT2_*.tar)")
        if not path.is_file():
            raise KoGPT2Error(f"--load_path {path}: no such checkpoint file")
        opened = open_checkpoint(path, pretrained)
    elif is_model_file(pretrained):
        opened = open_checkpoint(Path(pretrained).expanduser(), PRETRAINED)
    else:
        model, tokenizer = load_pretrained(pretrained)
        opened = OpenedModel(model, tokenizer, pretrained, None)
    opened.model.to(device=device, dtype=DTYPES[dtype] if dtype else None)
    return opened
