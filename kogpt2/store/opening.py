"""The one way to open a model: a checkpoint (ours or 2020's), a file main.py or the exporter wrote, a hub id, a
Hugging Face folder, or the v1 release files. Every CLI (training, generation, evaluation, export) comes here, so an
adapter checkpoint (``--lora``) opens like any other: its base is found, checked and the adapters merged into it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..corpus.tokenizer import Tokenizer, load_tokenizer
from ..defaults import PRETRAINED
from ..errors import KoGPT2Error
from ..model.gpt import GPT, GPTConfig
from ..model.hf_layout import hf_state_dict, infer_config, load_hf_state_dict
from ..model.lora import add_adapters, load_adapter_state, merge_adapters
from .checkpoint import (
    BaseModel,
    CheckpointRecord,
    adapters_of,
    find_checkpoint,
    load_checkpoint,
    read_record,
    tokenizer_of,
    weights_of,
    with_weights,
)
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


def open_checkpoint(path: Path, pretrained: str, merge: bool = True) -> OpenedModel:
    """A checkpoint file (ours, a 2020 one with ``pretrained``'s v1 tokenizer, or an exported one). An adapter
    checkpoint opens its base with the adapters merged in (``merge=False``: beside it, to resume training)."""
    payload = load_checkpoint(path)
    record = read_record(payload, path)
    if record.lora is not None:
        return OpenedModel(adapted_model(payload, record, merge), tokenizer_of(payload), str(path), record)
    model, tokenizer = model_from_checkpoint(payload, record, None if record.ours else load_pretrained_tokenizer(pretrained))
    return OpenedModel(model, tokenizer, str(path), record)


def adapted_model(payload: dict, record: CheckpointRecord, merge: bool) -> GPT:
    """An adapter checkpoint's base (found and checked) with its adapters, merged into the weights or beside them."""
    model = open_base(record.base, record.path)
    add_adapters(model, record.lora)
    try:
        load_adapter_state(model, adapters_of(payload))
    except KoGPT2Error as error:
        raise KoGPT2Error(f"{record.path}: {error}") from None
    if merge:
        merge_adapters(model)
    return model


def weights_sha256(model: GPT) -> str:
    """The checksum of a model's weights as loaded (names, shapes, dtypes and bytes; the tied head once), whatever
    file format they came in."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def base_reference(source: str, model: GPT) -> BaseModel:
    """How a LoRA run's checkpoints find their base again: ``--pretrained`` as a hub id, or the absolute path of its
    folder or file, with the checksum of ``model``, the base as opened."""
    path = Path(source).expanduser()
    kind = "file" if path.is_file() else "folder" if path.is_dir() else "hub"
    return BaseModel(source if kind == "hub" else str(path.resolve()), kind, weights_sha256(model))


def open_base(base: BaseModel, adapters: Path) -> GPT:
    """The base model of the adapters in ``adapters``, refused in one line if it is gone or not the one they were
    trained on."""
    if base.kind != "hub" and not Path(base.source).exists():
        raise KoGPT2Error(f"{adapters} holds LoRA adapters whose base model {base.source} is gone (moved or deleted); "
                          "put it back there to use them")
    model = open_model(None, base.source).model
    found = weights_sha256(model)
    if found != base.sha256:
        raise KoGPT2Error(f"{adapters} holds LoRA adapters for another base model than the one now at {base.source} "
                          f"(weights checksum {found[:12]}..., the adapters' base {base.sha256[:12]}...); put their "
                          "base back there")
    return model


def standalone_payload(payload: dict, record: CheckpointRecord) -> dict:
    """A checkpoint's payload as a whole model: an adapter checkpoint's base with its adapters merged in; others as
    they are."""
    if record.lora is None:
        return payload
    return with_weights(payload, hf_state_dict(adapted_model(payload, record, merge=True)))


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
