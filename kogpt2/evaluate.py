"""Perplexity of a checkpoint (or a pretrained model) on a CSV column: the number main.py logs as val_ppl.

    python -m kogpt2.evaluate --load_path checkpoint/KoGPT2_best.tar --data_file_path valid.csv
"""
from __future__ import annotations

import argparse
import math
import sys

from .errors import KoGPT2Error, report_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kogpt2.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_path", default=None, help="checkpoint to evaluate (without it: --pretrained)")
    parser.add_argument("--pretrained", default="skt/kogpt2-base-v2", help="model to evaluate without --load_path")
    parser.add_argument("--data_file_path", required=True, help="CSV with the text column")
    parser.add_argument("--column", default="sent")
    parser.add_argument("--encoding", default=None)
    parser.add_argument("--max_len", type=int, default=None, help="block size (default: the checkpoint's training one)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)

    def work() -> int:
        loss, tokens = perplexity_of(args)
        print(f"perplexity {math.exp(min(loss, 50)):.4f} (loss {loss:.6f}) over {tokens} tokens of "
              f"{args.data_file_path}")
        return 0

    return report_errors(work)


def perplexity_of(args: argparse.Namespace) -> tuple[float, int]:
    from .data import load_rows, pack
    from .runtime import pick_device, pick_precision
    from .session import load_model
    from .train import evaluate

    device = pick_device(args.device)
    model, tokenizer, _, record = load_model(args.load_path, args.pretrained, device, "fp32")
    max_len = args.max_len or record.get("args", {}).get("max_len") or min(256, model.config.n_positions)
    if max_len > model.config.n_positions:
        raise KoGPT2Error(f"--max_len {max_len} is longer than the model's {model.config.n_positions} positions")
    rows, _ = load_rows(args.data_file_path, args.column, args.encoding, tokenizer)
    data = pack(rows, max_len, tokenizer.pad_id)
    loss = evaluate(model, data, args.batch_size, pick_precision(args.precision, device), progress=True)
    return loss, int(data.real_tokens.sum())


if __name__ == "__main__":
    sys.exit(main())
