"""Generate text from a fine-tuned checkpoint (or a pretrained model), interactively or in batch.

    python generator.py --load_path checkpoint/KoGPT2_checkpoint_100.tar --tmp_sent "내가 항상" --temperature 1.0
"""
import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="KoGPT2 문장 생성 / generate text that starts with your phrase.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_path", default=None, help="checkpoint (.tar) to generate from; without it, --pretrained")
    p.add_argument("--tmp_sent", default=None, help="first phrase; later ones are read from the input")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more varied")
    p.add_argument("--top_k", type=int, default=40, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus: smallest set of tokens reaching this probability")
    p.add_argument("--text_size", type=int, default=250, help="most new tokens per sample")
    p.add_argument("--loops", type=int, default=-1, help="prompts to answer before exiting (-1: until quit)")
    p.add_argument("--samples", default=None, help="folder: save each result as a file with its settings")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help=">1 makes repeated tokens less likely")
    p.add_argument("--no_repeat_ngram", type=int, default=0, help="forbid repeating any n-gram of this size (0 = off)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (generated together)")
    p.add_argument("--seed", type=int, default=None, help="same checkpoint, prompt, settings and seed give the same text")
    p.add_argument("--stop", action="append", help="extra stop string (repeatable)")
    p.add_argument("--pretrained", default="skt/kogpt2-base-v2",
                   help="model to sample when there is no --load_path; the v1 tokenizer for 2020 checkpoints")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' precision for generation")
    p.add_argument("--prompts", default=None, help="batch mode: a text file (one prompt a line) or a CSV (see --column)")
    p.add_argument("--column", default="sent", help="CSV column of --prompts")
    p.add_argument("--output", default=None, help="batch mode: write samples to .csv (UTF-8 with BOM) or .jsonl")
    p.add_argument("--report", default=None, help="write a JSON report: copy rate, longest run shared with the "
                                                      "training text, distinct-1/2")
    p.add_argument("--no_copy", action="store_true", help="draw again any sample that repeats the training text")
    p.add_argument("--copy_words", type=int, default=8,
                   help="with --no_copy, the longest run of words a sample may share with a training row")
    p.add_argument("--data_file_path", default=None,
                   help="training CSV for --report/--no_copy (default: the one the checkpoint was trained on)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error("--num_samples must be at least 1")
    if args.output and not args.prompts:
        p.error("--output needs --prompts")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from kogpt2.errors import report_errors

    def work() -> int:
        from kogpt2.session import run

        return run(args)

    return report_errors(work, interrupted=0)  # Ctrl-C simply ends the session


if __name__ == "__main__":
    sys.exit(main())
