"""Fine-tune KoGPT2 on the text column of a CSV (or its question/answer pairs, --chat), with resumable checkpoints.

    python main.py --epoch 5 --data_file_path data/sample.csv --save_path checkpoint/
    python main.py --epoch 8 --data_file_path data/sample.csv --save_path checkpoint/ --load_path checkpoint/
"""
import argparse
import sys

from kogpt2 import defaults
from kogpt2.arguments import HelpFormatter, device, given_flags, integer, number
from kogpt2.scratch import DEFAULT_SIZE, SIZES


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="KoGPT2 파인튜닝 / fine-tune KoGPT2 on the text column of a CSV.",
                                formatter_class=HelpFormatter)
    p.add_argument("--epoch", type=integer(1), default=defaults.EPOCHS,
                   help="total epochs of the run (a resume continues up to this)")
    p.add_argument("--data_file_path", default="data/sample.csv", help="training CSV (columns score,genre,sent)")
    p.add_argument("--save_path", default=defaults.SAVE_PATH, help="folder for checkpoints and metrics.jsonl")
    p.add_argument("--load_path", default=None,
                   help="checkpoint to continue from (a folder: its newest checkpoint); if there is none, start from "
                        "--pretrained")
    p.add_argument("--batch_size", type=integer(1), default=defaults.BATCH_SIZE, help="blocks per batch")
    p.add_argument("--samples", default=None, help="folder where the samples printed during training are saved")
    p.add_argument("--pretrained", default=defaults.PRETRAINED,
                   help=f"model to start from (default: {defaults.PRETRAINED}): a hub id, a folder (config.json + "
                        "weights + tokenizer.json, or v1 *.params + *.spiece), a .tar this tool wrote, or "
                        f"scratch[:SIZE] to learn a tokenizer and a fresh GPT-2 from the CSV alone; sizes: "
                        f"{', '.join(SIZES)} (scratch alone: {DEFAULT_SIZE})")
    p.add_argument("--vocab_size", type=integer(100), default=None,
                   help="tokenizer size for --pretrained scratch (default: from the amount of text)")
    p.add_argument("--dropout", type=number(0, 0.99), default=None,
                   help="dropout rate while fine-tuning, in [0, 0.99] (default: the model's)")
    p.add_argument("--column", default=defaults.TEXT_COLUMN, help="CSV column holding the text")
    p.add_argument("--chat", action="store_true",
                   help="train a chatbot on question/answer rows (ChatbotData.csv: Q,A,label), KoGPT2-chatbot layout")
    p.add_argument("--question_column", default=defaults.QUESTION_COLUMN, help="with --chat: the questions' column")
    p.add_argument("--answer_column", default=defaults.ANSWER_COLUMN, help="with --chat: the answers' column")
    p.add_argument("--encoding", default=None,
                   help="CSV encoding (default: detect UTF-8 with or without BOM, CP949/EUC-KR)")
    p.add_argument("--no_cache", action="store_true",
                   help="do not read or write the token cache (.NAME.kogpt2cache.npz next to the CSV)")
    p.add_argument("--lr", type=number(above=0), default=None,
                   help=f"peak learning rate of AdamW (default: {defaults.FINETUNE_LR} as the original; "
                        f"{defaults.SCRATCH_LR} for --pretrained scratch)")
    p.add_argument("--warmup", type=integer(-1), default=-1, help="warmup steps (-1: 5%% of the run)")
    p.add_argument("--max_len", type=integer(8), default=None,
                   help=f"tokens per training block (default: {defaults.MAX_LEN} or the model's context)")
    p.add_argument("--grad_accum", type=integer(1), default=1, help="batches per optimizer step")
    p.add_argument("--val_ratio", type=number(0, 0.9), default=0.1, help="share of rows held out for validation")
    p.add_argument("--val_file", default=None, help="validation CSV instead of --val_ratio")
    p.add_argument("--eval_every", type=integer(0), default=0, help="evaluate every N steps (0: at each epoch end)")
    p.add_argument("--save_every", type=integer(1), default=500,
                   help="write a checkpoint every N steps (and at epoch ends)")
    p.add_argument("--keep_last", type=integer(0), default=3, help="regular checkpoints kept on disk (0: all)")
    p.add_argument("--patience", type=integer(0), default=0,
                   help="stop after N evaluations without a better validation loss (0: off)")
    p.add_argument("--tensorboard", action="store_true", help="also log to SAVE_PATH/tensorboard (needs tensorboard)")
    p.add_argument("--seed", type=integer(0), default=42, help="random seed: same arguments and seed give the same run")
    p.add_argument("--device", type=device, default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPUs that have it, fp16 with a gradient scaler on older GPUs "
                        "(T4, V100, P100), fp32 on the CPU")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the training step (auto: on for CUDA); if compiling fails, training goes on "
                        "without it")
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="recompute activations in the backward pass: much less memory, about a third slower, the same "
                        "gradients")
    args = p.parse_args(argv)
    args.given = given_flags(p, argv)
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
