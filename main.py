"""Fine-tune KoGPT2 on the text column of a CSV, with resumable checkpoints.

    python main.py --epoch 5 --data_file_path data/sample.csv --save_path checkpoint/ \
        --load_path checkpoint/KoGPT2_checkpoint_100.tar
"""
import argparse
import sys

from kogpt2.scratch import DEFAULT_SIZE, SIZES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="KoGPT2 파인튜닝 / fine-tune KoGPT2 on the text column of a CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epoch", type=int, default=5, help="total epochs of the run (a resume continues up to this)")
    p.add_argument("--data_file_path", default="data/sample.csv", help="training CSV (columns score,genre,sent)")
    p.add_argument("--save_path", default="checkpoint/", help="folder for checkpoints and metrics.jsonl")
    p.add_argument("--load_path", default=None,
                   help="checkpoint to continue from (a folder: its newest checkpoint); if there is none, start from "
                        "--pretrained")
    p.add_argument("--batch_size", type=int, default=4, help="blocks per batch")
    p.add_argument("--samples", default=None, help="folder where the samples printed during training are saved")
    p.add_argument("--pretrained", default="skt/kogpt2-base-v2",
                   help="hub id, a folder (config.json + weights + tokenizer.json, or v1 *.params + *.spiece), or "
                        f"scratch[:SIZE] to learn a tokenizer and a fresh GPT-2 from the CSV alone; sizes: "
                        f"{', '.join(SIZES)} (default {DEFAULT_SIZE})")
    p.add_argument("--vocab_size", type=int, default=None, help="tokenizer size for --pretrained scratch (default: from the amount of text)")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate while fine-tuning (default: the model's)")
    p.add_argument("--column", default="sent", help="CSV column holding the text")
    p.add_argument("--encoding", default=None, help="CSV encoding (default: detect UTF-8, UTF-8 with BOM, CP949/EUC-KR)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of AdamW (default: 3e-5 as the original; 1e-3 for --pretrained scratch)")
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps (-1: 5%% of the run)")
    p.add_argument("--max_len", type=int, default=None, help="tokens per training block (default: 256 or the model's context)")
    p.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--val_ratio", type=float, default=0.1, help="share of rows held out for validation")
    p.add_argument("--val_file", default=None, help="validation CSV instead of --val_ratio")
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: at each epoch end)")
    p.add_argument("--save_every", type=int, default=500, help="write a checkpoint every N steps (and at epoch ends)")
    p.add_argument("--keep_last", type=int, default=3, help="regular checkpoints kept on disk (0: all)")
    p.add_argument("--patience", type=int, default=0, help="stop after N evaluations without a better validation loss (0: off)")
    p.add_argument("--tensorboard", action="store_true", help="also log to SAVE_PATH/tensorboard (needs tensorboard)")
    p.add_argument("--seed", type=int, default=42, help="random seed: same arguments and seed give the same run")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on capable GPUs, fp32 otherwise")
    args = p.parse_args(argv)
    for name in ("epoch", "batch_size", "grad_accum", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not 0 <= args.val_ratio < 1:
        p.error("--val_ratio must be in [0, 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from kogpt2.errors import report_errors

    def work() -> int:
        from kogpt2.finetune import run

        return run(args)

    return report_errors(work, interrupted_message="interrupted before training started; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
