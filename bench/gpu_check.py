"""transformers and kogpt2-finetune side by side on one CUDA GPU, each contender in its own process.

    python bench/gpu_check.py          # on a GPU: the table, bench/gpu_results.json; exit 1 if a target fails
    python bench/gpu_check.py --smoke  # every code path with tiny models on the CPU (the tests run this)

Training (bf16 autocast, fused AdamW, gradient clipping for both) at 8 x 512 and 16 x 1024, eager and compiled;
decoding in bf16 at batch 1 and 8 (transformers `generate`, eager and with its static cache + compile where it
has one; ours: the engine generator.py uses, fixed-shape steps replayed as a CUDA graph); `main.py` end to end on a
small CSV. MFU counts 6N + 12·L·d·T FLOPs per token against the GPU's dense bf16 peak. About 5 minutes on an H200.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}
SHAPES = {"8x512": (8, 512), "16x1024": (16, 1024)}
TARGETS = [  # (what, measured key, other key or None, goal)
    ("train 16x1024 compiled: MFU", "train_ours_16x1024_compile", "mfu", 0.40),
    ("train 16x1024: ours / transformers compiled", "train_ours_16x1024_compile", "train_hf_16x1024_compile", 1.25),
    ("train 8x512: ours / transformers compiled", "train_ours_8x512_compile", "train_hf_8x512_compile", 1.25),
    ("decode batch 1 bf16: tokens/s", "decode_ours_1", None, 1500),
    ("decode batch 1: ours / transformers eager", "decode_ours_1", "decode_hf_1", 5.0),
    ("decode batch 8 bf16: tokens/s in total", "decode_ours_8", None, 5000),
]


def sizes(smoke: bool):
    from kogpt2.model.gpt import GPTConfig

    if smoke:
        return GPTConfig(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=2), {"8x512": (2, 32)}
    return GPTConfig(), SHAPES


def device_and_sync(torch):
    if torch.cuda.is_available():
        return "cuda", torch.cuda.synchronize
    return "cpu", lambda: None


def flops_per_token(config, params: int, block: int) -> float:
    return 6 * params + 12 * config.n_layer * config.n_embd * block


def hf_model(config, torch):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                                      n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=3, attn_implementation="sdpa"))


def train(kind: str, shape: str, compiled: bool, smoke: bool) -> dict:
    import torch

    from kogpt2.corpus.packing import PackedData
    from kogpt2.model.gpt import GPT
    from kogpt2.train.trainer import Trainer, TrainSettings

    config, shapes = sizes(smoke)
    batch, block = shapes[shape]
    device, sync = device_and_sync(torch)
    steps, warmup = (2, 1) if smoke else (12, 4)
    torch.manual_seed(0)
    blocks = torch.randint(0, config.vocab_size, (batch * (steps + warmup), block + 1))
    if kind == "hf":
        model = hf_model(config, torch).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True)
        forward = torch.compile(model) if compiled else model

        def step(i: int) -> None:
            chunk = blocks[i * batch:(i + 1) * batch].to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = forward(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        params = model.num_parameters()
    else:
        model = GPT(config).to(device)
        data = PackedData(blocks, torch.full((len(blocks),), block), len(blocks), 0, blocks.numel())
        folder = tempfile.mkdtemp()
        trainer = Trainer(model, _NoTokenizer(), data, None, TrainSettings(
            save_path=folder, batch_size=batch, precision="bf16", warmup=0, compile=compiled), source={})
        model.train()

        def step(i: int) -> None:
            trainer._step([torch.arange(i * batch, (i + 1) * batch)], False)
        params = model.num_parameters()
    for i in range(steps + warmup):
        if i == warmup:
            sync()
            start = time.perf_counter()
        step(i)
    sync()
    tokens_per_s = steps * batch * block / (time.perf_counter() - start)
    return {"tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token(config, params, block)}


class _NoTokenizer:  # the Trainer keeps a tokenizer only for checkpoints; none are written here
    kind, data, bos_id, eos_id, pad_id, unk_id = "tokenizers", b"", 1, 1, 3, 5


def decode(kind: str, batch: int, smoke: bool, static_compile: bool = False) -> dict:
    import torch

    from kogpt2.defaults import SamplingSettings
    from kogpt2.generation.engine import TokenList, generate_ids
    from kogpt2.model.gpt import GPT

    config, _ = sizes(smoke)
    device, sync = device_and_sync(torch)
    new_tokens = 16 if smoke else 256
    prompt = list(range(10, 30))
    if kind == "hf":
        model = hf_model(config, torch).to(device, torch.bfloat16).eval()
        ids = torch.tensor([prompt] * batch, device=device)
        options = dict(do_sample=True, top_k=40, top_p=0.9, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=3)
        if static_compile:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            options["cache_implementation"] = "static"
        for _ in range(2):  # warm up (compilation, lazy kernels)
            model.generate(ids, **{**options, "max_new_tokens": 8, "min_new_tokens": 8})
        sync()
        start = time.perf_counter()
        out = model.generate(ids, **options)
        sync()
        produced = (out.shape[1] - ids.shape[1]) * batch
    else:
        model = GPT(config).to(device, torch.bfloat16).eval()
        settings = SamplingSettings(temperature=1.0, top_k=40, top_p=0.9, text_size=new_tokens)
        run = lambda size: list(generate_ids(  # noqa: E731
            model, prompt, SamplingSettings(text_size=size) if size != new_tokens else settings,
            [TokenList() for _ in range(batch)], torch.Generator(device=device).manual_seed(0), [0, 3, 5], static=True))
        run(8)
        sync()
        start = time.perf_counter()
        produced = len(run(new_tokens))
        sync()
    return {"tokens_per_s": produced / (time.perf_counter() - start)}


def main_end_to_end(smoke: bool) -> dict:
    """main.py as a user runs it: --pretrained scratch (no download) on the sample CSV, on this machine's device."""
    with tempfile.TemporaryDirectory() as folder:
        size = "tiny" if smoke else "base"
        command = [sys.executable, "main.py", "--pretrained", f"scratch:{size}", "--epoch", "1" if smoke else "3",
                   "--max_len", "64" if smoke else "256", "--batch_size", "8" if smoke else "16", "--save_path", folder,
                   "--save_every", "100000", "--val_ratio", "0.1"]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
        log = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        return {"seconds": seconds, "tokens_per_s": log[-1]["tokens_per_s"],
                "line": next(l for l in result.stdout.splitlines() if l.startswith("training:"))}


def one(name: str, smoke: bool) -> dict:
    parts = name.split("_")
    if parts[0] == "train":
        return train(parts[1], parts[2], parts[3] == "compile", smoke)
    if parts[0] == "decode":
        return decode(parts[1], int(parts[2]), smoke, static_compile=len(parts) > 3)
    return main_end_to_end(smoke)


def contenders(smoke: bool) -> list[str]:
    _, shapes = sizes(smoke)
    names = [f"train_{kind}_{shape}_{mode}" for shape in shapes for mode in ("eager", "compile")
             for kind in ("hf", "ours")]
    names += [f"decode_{kind}_{batch}" for batch in (1, 8) for kind in ("hf", "ours")]
    return names + ["decode_hf_1_static", "main_e2e"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks every path, measures nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one contender in this process, print its JSON
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(one(args.one, args.smoke)))
        except Exception as error:  # a contender the installed versions cannot run is reported, not fatal
            print(json.dumps({"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}))
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (or --smoke to check the script)")
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    results = {}
    for contender in contenders(args.smoke):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--one", contender, *(["--smoke"] if args.smoke else [])],
                             capture_output=True, text=True, timeout=900)
        lines = out.stdout.strip().splitlines()
        results[contender] = json.loads(lines[-1]) if lines else {"error": out.stderr.strip()[-300:]}
        if peak and "flops_per_token" in results[contender]:
            results[contender]["mfu"] = results[contender]["flops_per_token"] * results[contender]["tokens_per_s"] / peak
        shown = results[contender].get("error") or f"{results[contender]['tokens_per_s']:,.0f} tokens/s" + (
            f", MFU {results[contender]['mfu']:.1%}" if "mfu" in results[contender] else "")
        print(f"{contender:28s} {shown}  ({time.perf_counter() - started:.0f} s)", flush=True)
    verdicts = []
    for what, key, other, goal in TARGETS:
        if args.smoke:
            break
        mine, theirs = results.get(key, {}), results.get(other, {}) if other and other != "mfu" else {}
        if other == "mfu":
            value = mine.get("mfu")
        elif other:
            value = mine["tokens_per_s"] / theirs["tokens_per_s"] if "tokens_per_s" in mine and "tokens_per_s" in theirs else None
        else:
            value = mine.get("tokens_per_s")
        verdict = "PASS" if value is not None and value >= goal else "FAIL"
        verdicts.append({"target": what, "measured": value, "goal": goal, "result": verdict})
        print(f"{what:48s} {value if value is None else round(value, 3)!s:>10}  >= {goal}  {verdict}")
    if not args.smoke:
        summary = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
                   "peak_bf16_flops": peak, "results": results, "targets": verdicts}
        (REPO / "bench" / "gpu_results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    failed = [r for r in results.values() if "error" in r]
    if args.smoke:
        return 1 if [k for k, r in results.items() if "error" in r and k != "decode_hf_1_static"] else 0
    return 1 if failed or any(v["result"] == "FAIL" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
