"""Model FLOPs utilisation of bf16 training at batch 8 x 512 on a CUDA GPU (the H100 target: at least 40%).

    python bench/gpu_mfu.py           # on a GPU: eager, torch.compile, and compile with larger loss chunks;
                                      # prints each, writes bench/gpu_results.json, exit 1 if the best is under 40%
    python bench/gpu_mfu.py --smoke   # every variant with a tiny model on the CPU (~1 min): checks the script only
MFU = (6 x parameters + 12 x layers x n_embd x sequence) x tokens/s / the GPU's dense bf16 peak (the count of the
PaLM paper's appendix B). Every variant runs the product's own Trainer step: fused AdamW, the chunked head +
cross-entropy, gradient clipping. One run fits in a few minutes, so a lent GPU's 15 minutes cover it with a rerun.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kogpt2.loss as loss_module  # noqa: E402
from kogpt2.packing import PackedData  # noqa: E402
from kogpt2.model import GPT, GPTConfig  # noqa: E402
from kogpt2.train import Trainer, TrainSettings  # noqa: E402

HERE = Path(__file__).resolve().parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s (SXM)
TARGET = 0.40


@dataclass
class Variant:
    name: str
    compile: bool
    loss_chunk: int  # logits per chunk of the head + cross-entropy


VARIANTS = [
    Variant("eager", False, loss_module.CHUNK_ELEMENTS),
    Variant("compile", True, loss_module.CHUNK_ELEMENTS),
    Variant("compile, loss chunks x8", True, 8 * loss_module.CHUNK_ELEMENTS),
]


class _Tokenizer:  # Trainer only stores a tokenizer in checkpoints; none are written here
    kind, data, bos_id, eos_id, pad_id, unk_id = "tokenizers", b"", 1, 1, 3, 5


def flops_per_token(model: GPT, block: int) -> float:
    c = model.config
    return 6 * model.num_parameters() + 12 * c.n_layer * c.n_embd * block


def measure(variant: Variant, config: GPTConfig, device: str, batch: int, block: int, steps: int, warmup: int) -> dict:
    """tokens/s of ``steps`` bf16 optimizer steps after ``warmup`` (compilation happens there)."""
    loss_module.CHUNK_ELEMENTS = variant.loss_chunk
    torch.manual_seed(0)
    model = GPT(config).to(device)
    blocks = torch.randint(0, config.vocab_size, (batch * (steps + warmup), block + 1))
    data = PackedData(blocks, torch.full((len(blocks),), block), len(blocks), 0, blocks.numel())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(model, _Tokenizer(), data, None,
                          TrainSettings(save_path=folder, batch_size=batch, precision="bf16", warmup=0), source={})
        if variant.compile:
            trainer.forward_model = torch.compile(model)
        model.train()
        for i in range(steps + warmup):
            if i == warmup:
                sync()
                start = time.perf_counter()
            loss, _, _ = trainer._step([torch.arange(i * batch, (i + 1) * batch)], False)
        sync()
        tokens_per_s = steps * batch * block / (time.perf_counter() - start)
    return {"variant": variant.name, "tokens_per_s": tokens_per_s, "last_loss": loss,
            "flops_per_token": flops_per_token(model, block)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="every variant with a tiny model on the CPU")
    args = parser.parse_args()
    if args.smoke:
        for variant in VARIANTS:
            result = measure(variant, GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2),
                             "cpu", batch=2, block=32, steps=2, warmup=1)
            print(f"smoke, {variant.name}: {result['tokens_per_s']:,.0f} tokens/s, loss {result['last_loss']:.4f}")
            torch._dynamo.reset()
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (or --smoke to check the script)")
        return 2
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    results = []
    for variant in VARIANTS:
        torch.cuda.reset_peak_memory_stats()
        result = measure(variant, GPTConfig(), "cuda", batch=8, block=512, steps=20, warmup=5)
        result["mfu"] = result["flops_per_token"] * result["tokens_per_s"] / peak if peak else None
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results.append(result)
        mfu = f"MFU {result['mfu']:.1%}" if peak else "MFU unknown (no peak for this GPU)"
        print(f"{name}, {variant.name}: {result['tokens_per_s']:,.0f} tokens/s, {mfu}, "
              f"max memory {result['max_memory_gib']:.1f} GiB", flush=True)
        torch._dynamo.reset()
    best = max(results, key=lambda r: r["tokens_per_s"])
    summary = {"device": name, "peak_bf16_flops": peak, "torch": torch.__version__, "host": platform.node(),
               "batch": 8, "block": 512, "results": results, "best": best["variant"],
               "target_mfu": TARGET, "passed": bool(peak and best["mfu"] >= TARGET)}
    (HERE / "gpu_results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"best: {best['variant']}; target MFU >= {TARGET:.0%}: {'PASS' if summary['passed'] else 'FAIL'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
