"""Generate text from a fine-tuned checkpoint (or a pretrained model), interactively or in batch.

    python generator.py --load_path checkpoint/KoGPT2_checkpoint_100.tar --tmp_sent "내가 항상" --temperature 1.0
"""
import argparse
import sys

from kogpt2 import defaults
from kogpt2.arguments import HelpFormatter, device, given_flags, integer, number

SAMPLING = defaults.SAMPLING


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(description="KoGPT2 문장 생성 / generate text that starts with your phrase.",
                                formatter_class=HelpFormatter)
    p.add_argument("--load_path", default=None,
                   help="checkpoint (.tar) to generate from, or a folder (its KoGPT2_best.tar, else its newest); "
                        "without it, --pretrained")
    p.add_argument("--tmp_sent", default=None, help="first phrase; later ones are read from the input")
    p.add_argument("--temperature", type=number(0), default=SAMPLING.temperature, help="0 = greedy; higher = more varied")
    p.add_argument("--top_k", type=integer(0), default=SAMPLING.top_k, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=number(above=0, maximum=1), default=SAMPLING.top_p,
                   help="nucleus: smallest set of tokens reaching this probability, in (0, 1]")
    p.add_argument("--text_size", type=integer(1), default=SAMPLING.text_size, help="most new tokens per sample")
    p.add_argument("--loops", type=integer(-1), default=-1, help="prompts to answer before exiting (-1: until quit)")
    p.add_argument("--samples", default=None, help="folder: save each result as a file with its settings")
    p.add_argument("--repetition_penalty", type=number(above=0), default=SAMPLING.repetition_penalty,
                   help=">1 makes repeated tokens less likely")
    p.add_argument("--no_repeat_ngram", type=integer(0), default=SAMPLING.no_repeat_ngram,
                   help="forbid repeating any n-gram of this size (0 = off)")
    p.add_argument("--num_samples", type=integer(1), default=defaults.NUM_SAMPLES,
                   help="samples per prompt (generated together)")
    p.add_argument("--seed", type=integer(0), default=None,
                   help="same checkpoint, prompt, settings and seed give the same text (default: a new one each time)")
    p.add_argument("--stop", action="append", help="extra stop string (repeatable)")
    p.add_argument("--pretrained", default=defaults.PRETRAINED,
                   help=f"model to sample when there is no --load_path, and the v1 tokenizer for 2020 checkpoints "
                        f"(default: {defaults.PRETRAINED})")
    p.add_argument("--device", type=device, default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights' precision for generation (bf16 and fp32 give different text for the same seed)")
    p.add_argument("--prompts", default=None, help="batch mode: a text file (one prompt a line) or a CSV (see --column)")
    p.add_argument("--column", default=defaults.TEXT_COLUMN,
                   help="CSV column of --prompts; also of --data_file_path when the checkpoint names none")
    p.add_argument("--encoding", default=None,
                   help="encoding of --prompts (default: detect UTF-8, CP949/EUC-KR)")
    p.add_argument("--output", default=None, help="batch mode: write samples to .csv (UTF-8 with BOM) or .jsonl")
    p.add_argument("--report", default=None, help="write a JSON report: copy rate, longest run shared with the "
                                                      "training text, distinct-1/2")
    p.add_argument("--no_copy", action="store_true", help="draw again any sample that repeats the training text")
    p.add_argument("--copy_words", type=integer(1), default=8,
                   help="with --no_copy, the longest run of words a sample may share with a training row")
    p.add_argument("--data_file_path", default=None,
                   help="training CSV for --report/--no_copy (default: the one the checkpoint was trained on)")
    p.add_argument("--chat", action="store_true",
                   help="chat (user > question, streamed answer) even if the checkpoint was not trained with --chat; "
                        f"unset sampling flags then take chat defaults: temperature {defaults.CHAT_SAMPLING.temperature}, "
                        f"repetition_penalty {defaults.CHAT_SAMPLING.repetition_penalty}, text_size "
                        f"{defaults.CHAT_SAMPLING.text_size}")
    p.add_argument("--history", type=integer(0), default=defaults.CHAT_HISTORY,
                   help="chat: earlier turns kept as context (0: each answer sees only its question)")
    p.add_argument("--question_column", default=defaults.QUESTION_COLUMN,
                   help="chat: CSV column of --prompts holding the questions")
    p.add_argument("--serve", action="store_true",
                   help="serve a web page and an OpenAI-style HTTP API instead of the prompt loop "
                        "(needs: pip install -r requirements-serve.txt)")
    p.add_argument("--host", default="127.0.0.1",
                   help="with --serve: the address to listen on (0.0.0.0 opens it to your network)")
    p.add_argument("--port", type=integer(1), default=8000, help="with --serve: the port")
    args = p.parse_args(argv)
    args.given = given_flags(p, argv)
    if args.output and not args.prompts:
        p.error("--output needs --prompts")
    if args.output and not args.output.lower().endswith((".csv", ".jsonl")):
        p.error(f"--output {args.output}: write to a .csv (opens in Excel) or a .jsonl file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from kogpt2.errors import report_errors

    def work() -> int:
        from kogpt2.prompt_loop import run

        return run(args)

    return report_errors(work, interrupted=0)  # Ctrl-C simply ends the session


if __name__ == "__main__":
    sys.exit(main())
