"""Model FLOPs utilisation of bf16 training at batch 8 x 512 on a CUDA GPU (the H100 target: at least 40%).

    python bench/gpu_mfu.py [--compile]
MFU = 6 x parameters x tokens/s (+ attention FLOPs) / the GPU's dense bf16 peak. Uses the product's own Trainer step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kogpt2.data import PackedData  # noqa: E402
from kogpt2.model import GPT, GPTConfig  # noqa: E402
from kogpt2.train import Trainer, TrainSettings  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s (SXM)
BATCH, BLOCK, STEPS, WARMUP = 8, 512, 20, 5


class _Tokenizer:  # Trainer only stores a tokenizer in checkpoints; none are written here
    kind, data, bos_id, eos_id, pad_id, unk_id, vocab_size = "tokenizers", b"", 1, 1, 3, 5, 51200


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine")
        return 2
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).cuda()
    blocks = torch.randint(0, 51200, (BATCH * (STEPS + WARMUP), BLOCK + 1))
    data = PackedData(blocks, torch.full((len(blocks),), BLOCK), len(blocks), 0, blocks.numel())
    trainer = Trainer(model, _Tokenizer(), data, None, TrainSettings(batch_size=BATCH, precision="bf16", warmup=0),
                      record={})
    if args.compile:
        trainer.forward_model = torch.compile(model)
    model.train()
    for i in range(STEPS + WARMUP):
        if i == WARMUP:
            torch.cuda.synchronize()
            start = time.perf_counter()
        trainer._step([torch.arange(i * BATCH, (i + 1) * BATCH)], False)
    torch.cuda.synchronize()
    tokens_per_s = STEPS * BATCH * BLOCK / (time.perf_counter() - start)
    c = model.config
    flops_per_token = 6 * model.num_parameters() + 12 * c.n_layer * c.n_embd * BLOCK  # weights + attention
    mfu = flops_per_token * tokens_per_s / peak if peak else float("nan")
    print(f"{name}: {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} (peak {peak / 1e12 if peak else 0:.0f} TFLOP/s), "
          f"max memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, compile={args.compile}")
    return 0 if mfu >= 0.40 else 1


if __name__ == "__main__":
    sys.exit(main())
