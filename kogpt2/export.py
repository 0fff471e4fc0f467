"""Export a checkpoint for use elsewhere.

    python -m kogpt2.export checkpoint/KoGPT2_best.tar out.tar --half   # generation-only file (~250 MB at full size)
    python -m kogpt2.export checkpoint/KoGPT2_best.tar hf-model/ [--half] # Hugging Face folder for transformers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import generation_payload, is_ours, load_checkpoint, save_checkpoint
from .errors import KoGPT2Error
from .model import GPTConfig
from .tokenizer import HFTokenizer, tokenizer_from_bytes


def export_generation_file(payload: dict, target: Path, half: bool) -> None:
    save_checkpoint(target, generation_payload(payload, torch.bfloat16 if half else torch.float32))


def export_hf_folder(payload: dict, target: Path, half: bool) -> None:
    """config.json, model.safetensors, tokenizer.json (+ its config) and generation_config.json, loadable by
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)`` with no extra arguments."""
    from safetensors.torch import save_file

    record = payload["tokenizer"]
    tokenizer = tokenizer_from_bytes(record["kind"], record["data"].numpy().tobytes())
    if not isinstance(tokenizer, HFTokenizer):
        raise KoGPT2Error("this checkpoint uses a SentencePiece (v1 or scratch) tokenizer, which cannot be written as "
                          "a Hugging Face tokenizer.json yet; export it as a .tar generation file instead")
    config = GPTConfig.from_dict(payload["config"])
    slim = generation_payload(payload, torch.bfloat16 if half else torch.float32)
    target.mkdir(parents=True, exist_ok=True)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    hf_config = {**config.to_hf(), **ids, "torch_dtype": "bfloat16" if half else "float32"}
    (target / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in slim["model_state_dict"].items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    (target / "tokenizer.json").write_bytes(tokenizer.data)
    names = {name: tokenizer._tok.id_to_token(i) for name, i in
             (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id),
              ("unk_token", tokenizer.unk_id))}
    (target / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.n_positions,
         "clean_up_tokenization_spaces": False, **names}, ensure_ascii=False, indent=2), encoding="utf-8")
    (target / "generation_config.json").write_text(json.dumps(
        {**ids, "do_sample": True, "top_k": 40, "top_p": 0.9, "max_new_tokens": 250}, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kogpt2.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .tar written by main.py")
    parser.add_argument("out", help="OUT.tar: generation-only file; any other path: Hugging Face folder")
    parser.add_argument("--half", action="store_true", help="bf16 weights (half the size)")
    args = parser.parse_args(argv)
    try:
        payload = load_checkpoint(args.checkpoint)
        if not is_ours(payload):
            raise KoGPT2Error(f"{args.checkpoint} is a 2020-format checkpoint; train one step from it with main.py first")
        target = Path(args.out)
        if target.suffix == ".tar":
            export_generation_file(payload, target, args.half)
        else:
            export_hf_folder(payload, target, args.half)
    except KoGPT2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
