"""Export a checkpoint for use elsewhere (an adapter checkpoint of a --lora run as its base with the adapters merged).

    python -m kogpt2.export checkpoint/KoGPT2_best.tar out.tar --half   # generation-only file (~250 MB at full size)
    python -m kogpt2.export checkpoint/KoGPT2_best.tar hf-model/ [--half] # Hugging Face folder for transformers
    python -m kogpt2.export checkpoint/KoGPT2_best.tar adapter/ --adapter # a --lora run's adapters for PEFT
"""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import torch

from .arguments import Parser
from .corpus.chat_format import ChatFormat
from .corpus.tokenizer import NEWLINE_V1, HFTokenizer
from .defaults import CHAT_SAMPLING, PRETRAINED, SAMPLING
from .errors import KoGPT2Error, report_errors, write_whole
from .generation.engine import never_generated
from .model.gpt import GPTConfig
from .store.checkpoint import (
    CheckpointRecord,
    adapters_of,
    find_checkpoint,
    generation_payload,
    load_checkpoint,
    read_record,
    save_checkpoint,
    tokenizer_of,
    weights_of,
)
from .store.opening import standalone_payload
from .store.scratch import is_scratch

V1_VOCAB_SIZE = 50000
AGAIN = "export again"  # what to do once a failed write's cause (a full disk) is fixed


def export_generation_file(payload: dict, target: Path, half: bool) -> None:
    save_checkpoint(target, generation_payload(payload, torch.bfloat16 if half else torch.float32))


def export_hf_folder(payload: dict, record: CheckpointRecord, target: Path, half: bool) -> None:
    """config.json, model.safetensors, tokenizer.json (+ its config), generation_config.json and a model card,
    loadable by ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)`` with no extra arguments, and
    generating like generator.py: the tokenizer adds the same start token (none for a chat model, whose examples
    start with ``<usr>``), and generation suppresses the same ids with the same sampling defaults (a chat model's
    answers also end at the next ``<usr>``)."""
    tokenizer = tokenizer_of(payload)
    config = GPTConfig.from_dict(record.config)
    slim = generation_payload(payload, torch.bfloat16 if half else torch.float32)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    hf_config = {**config.to_hf(), **ids, "torch_dtype": "bfloat16" if half else "float32"}
    write_json(target / "config.json", hf_config)
    weights = target / "model.safetensors"
    write_safetensors(weights_of(slim), weights)
    chat = record.chat
    write_tokenizer_files(tokenizer, config, chat, target)
    sampling = CHAT_SAMPLING if chat else SAMPLING
    ends = {"eos_token_id": [tokenizer.eos_id, ChatFormat(tokenizer).usr_id]} if chat else {}
    write_json(target / "generation_config.json", {
        **ids, **ends, "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,
        "top_p": sampling.top_p, "repetition_penalty": sampling.repetition_penalty,
        "max_new_tokens": sampling.text_size, "suppress_tokens": never_generated(tokenizer)})
    write_whole(target / "README.md", model_card(record, tokenizer).encode("utf-8"), AGAIN)


def write_json(path: Path, value: dict) -> None:
    write_whole(path, json.dumps(value, ensure_ascii=False, indent=2).encode("utf-8"), AGAIN)


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    write_whole(path, save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"}), AGAIN)


def write_tokenizer_files(tokenizer, config: GPTConfig, chat: bool, target: Path) -> None:
    """tokenizer.json and tokenizer_config.json, for ``AutoTokenizer.from_pretrained(target)``."""
    write_whole(target / "tokenizer.json", tokenizer_json(tokenizer, text_model=not chat), AGAIN)
    names = {name: tokenizer.id_to_piece(i) for name, i in
             (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id),
              ("unk_token", tokenizer.unk_id))}
    write_json(target / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.n_positions,
        "clean_up_tokenization_spaces": False, **names})


PEFT_PREFIX = "base_model.model."  # PeftModel's name for the wrapped GPT2LMHeadModel


def export_peft_folder(payload: dict, record: CheckpointRecord, target: Path, half: bool) -> str | None:
    """A --lora run's adapters as PEFT writes them (adapter_config.json, adapter_model.safetensors) with the tokenizer
    files, for ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), target)``. Our A [rank, in]
    and B [out, rank] are PEFT's ``lora_A.weight`` and ``lora_B.weight`` for GPT-2's Conv1D (fan_in_fan_out) as they
    are. Returns what to say when the base is not a folder or hub id that transformers opens."""
    if record.lora is None:
        raise KoGPT2Error(f"{record.path} holds a whole model, not LoRA adapters (trained with --lora): export it "
                          "without --adapter")
    lora, base = record.lora, record.base
    write_json(target / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.source, "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
        "fan_in_fan_out": True, "bias": "none", "inference_mode": True})
    dtype = torch.bfloat16 if half else torch.float32
    write_safetensors({f"{PEFT_PREFIX}{name}.weight": tensor.to(dtype) for name, tensor in adapters_of(payload).items()},
                      target / "adapter_model.safetensors")
    write_tokenizer_files(tokenizer_of(payload), GPTConfig.from_dict(record.config), record.chat, target)
    if base.kind != "hub" and not (Path(base.source) / "config.json").is_file():
        return (f"note: the base {base.source} is not a Hugging Face folder: export it too (python -m kogpt2.export "
                f"{base.source} BASE_FOLDER) and load the adapters onto that folder")
    return None


def tokenizer_json(tokenizer, text_model: bool) -> bytes:
    """The tokenizer as tokenizer.json. For a text model (one that continues a prompt) it adds the start token before
    every text, as generator.py and training do, and decodes new tokens with the space before their first word:
    transformers' text-generation pipeline decodes only the new tokens and appends them to the prompt, so a dropped
    space would glue the two ("카페에서친구를"). A chat model's answer is decoded as it was, from its first word."""
    from tokenizers import Tokenizer, processors

    data = tokenizer.data if isinstance(tokenizer, HFTokenizer) else sentencepiece_as_tokenizer_json(tokenizer.data)
    if not text_model:
        return data
    spec = json.loads(data)
    spec["decoder"] = keeping_the_first_space(spec["decoder"])
    hf = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    start = tokenizer.id_to_piece(tokenizer.bos_id)
    hf.post_processor = processors.TemplateProcessing(single=f"{start} $A", pair=f"{start} $A $B",
                                                      special_tokens=[(start, tokenizer.bos_id)])
    return hf.to_str().encode("utf-8")


def keeping_the_first_space(decoder: dict | None) -> dict | None:
    """``decoder`` (tokenizer.json's) without the step that drops the space before a decoded text's first word:
    Metaspace's prefix scheme, or the Strip that ends our SentencePiece conversion. A whole text then decodes with
    one space before it; new tokens decode with theirs."""
    if decoder is None:
        return None
    if decoder["type"] == "Metaspace":
        return {**{k: v for k, v in decoder.items() if k != "add_prefix_space"}, "prepend_scheme": "never"}
    if decoder["type"] == "Sequence":
        return {**decoder, "decoders": [keeping_the_first_space(step) for step in decoder["decoders"]
                                        if step["type"] != "Strip" or not step["start"]]}
    return decoder


def model_card(record: CheckpointRecord, tokenizer) -> str:
    """README.md of the exported folder: what the model is and the licence it inherits."""
    pretrained = str(record.pretrained or PRETRAINED)
    if is_scratch(pretrained):
        origin, licence = ("trained from scratch by kogpt2-finetune on the user's own text (no KoGPT2 weights)",
                           "the licence of the training text (no KoGPT2 weights are inside)")
    elif tokenizer.vocab_size == V1_VOCAB_SIZE:
        origin, licence = ("fine-tuned from SK Telecom's KoGPT2 v1 (2020)",
                           "Modified MIT License, as KoGPT2 v1 (https://github.com/SKT-AI/KoGPT2)")
    else:
        origin, licence = (f"fine-tuned from SK Telecom's KoGPT2 ({pretrained})",
                           "CC-BY-NC-SA 4.0, as KoGPT2 v2: non-commercial use only, share alike, attribution to "
                           "SK Telecom (https://creativecommons.org/licenses/by-nc-sa/4.0/)")
    return f"""---
license: {"cc-by-nc-sa-4.0" if "CC-BY-NC-SA" in licence else "other"}
language: ko
library_name: transformers
pipeline_tag: text-generation
---
# {tokenizer.kind} GPT-2, {origin}

- 라이선스 / licence: {licence}
- 학습 데이터 / training data: {record.data_path or "unknown"}
- 만든 도구 / made with: kogpt2-finetune (`python -m kogpt2.export`)

```python
from transformers import pipeline
generate = pipeline("text-generation", model="THIS_FOLDER")
print(generate("오늘 아침에", add_special_tokens=True)[0]["generated_text"])  # with the start token, as in training
```
"""


# ---- SentencePiece (v1, scratch) as a tokenizers BPE with the same ids -------------------------------------------------

PIECE_NORMAL, PIECE_USER_DEFINED = 1, 4
LINE_BREAK = "\ue000"  # private use: stands for "\n" while a text is normalised (a literal one would read as a line break)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _protobuf_fields(buf: bytes):
    """(field number, value) of one protobuf message: enough of the format to read a SentencePiece model."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise KoGPT2Error(f"unsupported protobuf wire type {wire} in the SentencePiece model")
        yield key >> 3, value


def sentencepiece_as_tokenizer_json(model: bytes) -> bytes:
    """The BPE SentencePiece model as a ``tokenizer.json`` giving the same ids as our encoder: its vocabulary, merges
    derived from the pieces' scores, its own precompiled normaliser, user-defined pieces whole wherever they appear
    (``<usr>질문<sys>답변``), and line breaks as ``<unused0>``; it decodes to the same text as our decoder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pieces, charsmap = [], b""
    for number, value in _protobuf_fields(model):
        if number == 1:  # ModelProto.pieces: {1: piece, 2: score, 3: type}
            piece = {"type": PIECE_NORMAL}
            for field, item in _protobuf_fields(value):
                if field == 1:
                    piece["piece"] = item.decode("utf-8")
                elif field == 2:
                    piece["score"] = struct.unpack("<f", item)[0]
                elif field == 3:
                    piece["type"] = item
            pieces.append(piece)
        elif number == 3:  # ModelProto.normalizer_spec: {2: precompiled_charsmap}
            charsmap = dict(_protobuf_fields(value)).get(2, b"")
    vocab = {p["piece"]: i for i, p in enumerate(pieces)}
    merges = []
    for piece in (p for p in pieces if p["type"] == PIECE_NORMAL):
        text = piece["piece"]
        pairs = [(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab]
        merges.extend((piece.get("score", 0.0), vocab[a], vocab[b], a, b) for a, b in pairs)
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    newline = NEWLINE_V1 if NEWLINE_V1 in vocab else ""
    atomic = [p["piece"] for p in pieces if p["type"] == PIECE_USER_DEFINED or p["piece"] == newline]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>",
                                     fuse_unk=True))
    # Each line as sentencepiece normalises it (charsmap, spaces collapsed and trimmed, "▁" before a non-empty line
    # and for each space), lines joined by <unused0>; a private-use character stands for the line break meanwhile.
    # User-defined pieces are added tokens found in the normalised text, so "<usr>질문" gives "▁", "<usr>", "질문"
    # as sentencepiece does; tokenizers normalises their own text too, which must stay bare: hence the last rule
    # (the one difference left: a text that is nothing but one such piece gets no "▁" before it).
    steps = [normalizers.Replace("\n", LINE_BREAK)]
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    steps += [normalizers.Replace(Regex(" {2,}"), " "),
              normalizers.Replace(Regex(f" *{LINE_BREAK} *"), LINE_BREAK),
              normalizers.Strip(),
              normalizers.Replace(Regex(f"{LINE_BREAK}(?=[^{LINE_BREAK}])"), LINE_BREAK + " "),
              normalizers.Prepend("▁"),
              normalizers.Replace(Regex(f"\\A▁{LINE_BREAK}"), LINE_BREAK),
              normalizers.Replace(" ", "▁"),
              normalizers.Replace(LINE_BREAK, newline)]
    if atomic:
        alternation = "|".join(re.escape(piece) for piece in sorted(atomic, key=len, reverse=True))
        steps.append(normalizers.Replace(Regex(f"\\A▁(?=(?:{alternation})\\z)"), ""))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.add_tokens([AddedToken(piece, normalized=True) for piece in atomic])
    # decode like ours: "▁" as spaces, <unused0> as a line break, and no space at the start of a line
    line_breaks = [decoders.Replace(f"{newline} ", "\n"), decoders.Replace(newline, "\n")] if newline else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), *line_breaks,
                                           decoders.Strip(" ", 1, 0)])
    return tokenizer.to_str().encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m kogpt2.export", description="체크포인트 내보내기 / " + __doc__)
    parser.add_argument("checkpoint", help="main.py가 쓴 .tar 또는 폴더 (그 안의 최고 체크포인트) / a .tar written by "
                                           "main.py, or a folder (its best checkpoint)")
    parser.add_argument("out", help="OUT.tar: 생성 전용 파일; 그 밖의 경로: Hugging Face 폴더 / OUT.tar: generation-only "
                                    "file; any other path: Hugging Face folder")
    parser.add_argument("--half", action="store_true", help="bf16 가중치 (크기 절반) / bf16 weights (half the size)")
    parser.add_argument("--adapter", action="store_true",
                        help="--lora 체크포인트의 어댑터만 PEFT 폴더로 / a --lora checkpoint's adapters alone, as a PEFT "
                             "folder (adapter_config.json, adapter_model.safetensors) for its base")
    args = parser.parse_args(argv)

    def work() -> int:
        path = find_checkpoint(args.checkpoint, prefer_best=True)
        if path is None:
            raise KoGPT2Error(f"{args.checkpoint}: the folder has no checkpoint (KoGPT2_*.tar)")
        payload = load_checkpoint(path)
        record = read_record(payload, path)
        if not record.ours:
            raise KoGPT2Error(f"{args.checkpoint} is a 2020-format checkpoint; train one step from it with main.py first")
        target = Path(args.out)
        note = None
        if args.adapter:
            note = export_peft_folder(payload, record, target, args.half)
        elif target.suffix == ".tar":
            export_generation_file(standalone_payload(payload, record), target, args.half)
        else:
            export_hf_folder(standalone_payload(payload, record), record, target, args.half)
        print(f"written: {args.out}")
        if note:
            print(note)
        return 0

    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
