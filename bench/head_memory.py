"""Peak memory of one training forward + backward of the head and its cross-entropy, on the CPU: the plain form that
CUDA and compiled steps ran before (every logit, an fp32 copy, its log-softmax and their gradients) against
``chunked_cross_entropy``, which runs there now. Each form runs in a process of its own; what is printed is its peak
resident memory above the inputs (hidden states, weight, targets).

    python bench/head_memory.py                   # 8 x 512 tokens, 51,200 words, n_embd 768, fp32
    python bench/head_memory.py --precision bf16  # under bf16 autocast
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def plain_cross_entropy(hidden, weight, targets):
    """What CUDA and compiled steps ran before: every logit in the autocast dtype, then an fp32 copy of them all (the
    tests' reference too)."""
    import torch.nn.functional as F

    from kogpt2.model.head_loss import IGNORE_INDEX

    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def measure(form: str, tokens: int, vocab: int, width: int, precision: str) -> None:
    """Prints this process's peak resident memory above the inputs, in MB, for one forward + backward."""
    import torch

    from kogpt2.model.head_loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    before = resident_mb()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = (plain_cross_entropy if form == "plain" else chunked_cross_entropy)(hidden, weight, targets)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"{peak - before:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=51_200)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only that it runs")
    parser.add_argument("--measure", choices=("plain", "chunked"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.length, args.vocab, args.width = 2, 16, 1000, 32
    tokens = args.batch * args.length
    if args.measure:
        measure(args.measure, tokens, args.vocab, args.width, args.precision)
        return 0
    print(f"head + cross-entropy, forward + backward: {args.batch} x {args.length} tokens, {args.vocab:,} words, "
          f"n_embd {args.width}, {args.precision}, CPU; peak resident memory above the inputs")
    peaks = {}
    for form in ("plain", "chunked"):
        child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                "--measure", form], capture_output=True, text=True, check=True)
        peaks[form] = float(child.stdout.split()[-1])
        print(f"{form:8s} {peaks[form]:8.0f} MB")
    print(f"chunked / plain: {peaks['chunked'] / max(peaks['plain'], 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
