"""transformers and kogpt2-finetune side by side on one CUDA GPU, each contender in its own process.

    python bench/gpu_check.py               # on a GPU: the table, bench/gpu_results.json; exit 1 if a target fails
    python bench/gpu_check.py --budget 300  # leave out the least important parts to fit (default 360 s)
    python bench/gpu_check.py --smoke       # every code path with tiny models on the CPU (the tests run this)

Training (bf16 autocast, fused AdamW, gradient clipping for both) at 8 x 512 and 16 x 1024, eager and compiled, two
rounds of 30 timed steps after the warm-up (the best counts); a compiled contender reports its graphs, graph breaks
and recompiles, and ours fails if it fell back to eager; on Hopper ours also reports the attention kernel it trained
with (cuDNN or flash, both timed at its shape). Decoding in bf16 at batch 1 and 8 (transformers `generate`,
eager and with its static cache + compile, warmed up at the timed length; ours: the engine generator.py uses, its
CUDA graph captured before the timer). The GPU-marked tests (`pytest -m gpu`), and `main.py` + `generator.py` end to
end: train, Ctrl-C, resume, generate in bf16. Each part runs in its own process and its result is written to
bench/gpu_results.json as soon as it is known. MFU counts 6N + 12·L·d·T FLOPs per token against the GPU's dense
bf16 peak.
"""
from __future__ import annotations

import argparse
import dataclasses
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
TIMED_STEPS = 30  # per round, two rounds: ~0.5 s windows were too short for a 1.25x verdict
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

    from kogpt2.model.gpt import GPT

    config, shapes = sizes(smoke)
    batch, block = shapes[shape]
    device, sync = device_and_sync(torch)
    steps, warmup = (2, 1) if smoke else (TIMED_STEPS, 4)
    torch.manual_seed(0)
    blocks = torch.randint(0, config.vocab_size, (batch * (steps + warmup), block + 1))
    torch._dynamo.utils.counters.clear()
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
        trainer = bench_trainer(model, blocks, batch, compiled)

        def step(i: int) -> None:
            trainer._step([torch.arange(i * batch, (i + 1) * batch)], False)
        params = model.num_parameters()
    for i in range(warmup):  # compiles, lazy kernels, allocator
        step(i)
    rounds = []
    for _ in range(2):  # best of two rounds of the same steps: one verdict is not one noisy window
        sync()
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        sync()
        rounds.append(steps * batch * block / (time.perf_counter() - start))
    result = {"tokens_per_s": max(rounds), "rounds": rounds, "flops_per_token": flops_per_token(config, params, block)}
    if kind == "ours" and trainer.attention is not None:  # Hopper: the attention kernel the run trained with
        result["attention"] = dataclasses.asdict(trainer.attention)
    if compiled:
        result.update(compile_report(torch))
        if kind == "ours" and trainer.forward_model is trainer.eager_model:
            result["error"] = "torch.compile fell back to eager (see the note it printed)"
    return result


def compile_report(torch) -> dict:
    """How the compiled step was compiled: graphs, breaks and recompiles (a break or a recompile costs time)."""
    counters = torch._dynamo.utils.counters
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values())}


class _BenchTokenizer:  # the Trainer keeps a tokenizer only for its checkpoints
    kind, data, bos_id, eos_id, pad_id, unk_id = "tokenizers", b"{}", 1, 1, 3, 5


def bench_trainer(model, blocks, batch: int, compiled: bool):
    """The trainer main.py runs, over random blocks, in bf16, checkpoints going to a temporary folder."""
    import torch

    from kogpt2.corpus.packing import PackedData
    from kogpt2.store.checkpoint import RunOrigin
    from kogpt2.train.trainer import Trainer, TrainSettings

    block = blocks.shape[1] - 1
    data = PackedData(blocks, torch.full((len(blocks),), block), len(blocks), 0, blocks.numel())
    settings = TrainSettings(save_path=tempfile.mkdtemp(), batch_size=batch, precision="bf16", warmup=0,
                             compile=compiled, keep_last=0)
    origin = RunOrigin("random blocks", "", "sent", "none", {}, "text", "bench")
    model.train()
    return Trainer(model, _BenchTokenizer(), data, None, settings, origin=origin)


def checkpoint_stall(smoke: bool) -> dict:
    """How long a checkpoint (model and AdamW moments) holds training up: written in place, or copied to the host
    and written by a thread as main.py does on a GPU."""
    import torch

    from kogpt2.model.gpt import GPT
    from kogpt2.store.checkpoint import CheckpointWriter

    config, shapes = sizes(smoke)
    batch, block = shapes["8x512"]
    device, sync = device_and_sync(torch)
    trainer = bench_trainer(GPT(config).to(device), torch.randint(0, config.vocab_size, (batch, block + 1)), batch,
                            False)
    trainer._step([torch.arange(batch)], False)  # the optimizer's moments exist
    stalls = {}
    for background in (False, True):
        trainer.checkpoints = CheckpointWriter(background)
        trainer.progress.step += 1  # a file of its own
        sync()
        start = time.perf_counter()
        trainer.save()
        stalls[background] = time.perf_counter() - start
        trainer.checkpoints.wait()
    return {"in_place_s": stalls[False], "background_s": stalls[True],
            "summary": f"a checkpoint stalls training {stalls[False]:.2f} s in place, {stalls[True]:.2f} s in the "
                       "background"}


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
        # warm up at the timed length: a static cache of another size would be compiled again inside the timer
        model.generate(ids, **options)
        rounds = []
        for _ in range(2):
            sync()
            start = time.perf_counter()
            out = model.generate(ids, **options)
            sync()
            rounds.append((out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - start))
    else:
        model = GPT(config).to(device, torch.bfloat16).eval()
        settings = SamplingSettings(temperature=1.0, top_k=40, top_p=0.9, text_size=new_tokens)
        run = lambda: list(generate_ids(  # noqa: E731
            model, prompt, settings, [TokenList() for _ in range(batch)], torch.Generator(device=device).manual_seed(0),
            [0, 3, 5], static=True))
        run()  # captures the graph of every visible length the timed runs reach, outside the timer
        rounds = []
        for _ in range(2):
            sync()
            start = time.perf_counter()
            produced = len(run())
            sync()
            rounds.append(produced / (time.perf_counter() - start))
    return {"tokens_per_s": max(rounds), "rounds": rounds}


def main_end_to_end(smoke: bool) -> dict:
    """main.py and generator.py as a user runs them on this machine's device: train (--pretrained scratch, no
    download), Ctrl-C after the first checkpoint, resume to the end, then generate in bf16 from the best checkpoint."""
    import signal

    with tempfile.TemporaryDirectory() as folder:
        size = "tiny" if smoke else "base"
        command = [sys.executable, "main.py", "--pretrained", f"scratch:{size}", "--epoch", "2" if smoke else "3",
                   "--max_len", "64" if smoke else "256", "--batch_size", "8" if smoke else "16", "--save_path", folder,
                   "--save_every", "5", "--val_ratio", "0.1"]
        started = time.perf_counter()
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not list(Path(folder).glob("KoGPT2_checkpoint_*.tar")) and first.poll() is None:
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=600)
        if first.returncode not in (0, 130):
            return {"error": f"interrupted run: {(err.strip().splitlines() or ['?'])[-1]}"}
        resumed = subprocess.run(command + ["--load_path", folder], cwd=REPO, capture_output=True, text=True,
                                 timeout=600)
        seconds = time.perf_counter() - started
        if resumed.returncode != 0 or "resuming from" not in resumed.stdout:
            return {"error": f"resume: {(resumed.stderr.strip().splitlines() or ['did not resume'])[-1]}"}
        generated = subprocess.run([sys.executable, "generator.py", "--load_path", folder, "--tmp_sent", "오늘",
                                    "--dtype", "auto", "--seed", "1", "--loops", "0"], cwd=REPO, capture_output=True,
                                   text=True, timeout=300, stdin=subprocess.DEVNULL)
        if generated.returncode != 0 or not generated.stdout.startswith("오늘"):
            return {"error": f"generator: {(generated.stderr.strip().splitlines() or ['no text'])[-1]}"}
        log = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        return {"seconds": seconds, "tokens_per_s": log[-1]["tokens_per_s"],
                "line": next(l for l in resumed.stdout.splitlines() if l.startswith("training:"))}


def gpu_tests() -> dict:
    """The tests only a GPU can run (tests/test_on_gpu.py: a real CUDA graph, one compile, fp16 overflow)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    summary = (result.stdout.strip().splitlines() or ["?"])[-1]
    return {"summary": summary} if result.returncode == 0 else {"error": summary}


def one(name: str, smoke: bool) -> dict:
    parts = name.split("_")
    if parts[0] == "train":
        return train(parts[1], parts[2], parts[3] == "compile", smoke)
    if parts[0] == "decode":
        return decode(parts[1], int(parts[2]), smoke, static_compile=len(parts) > 3)
    if parts[0] == "tests":
        return gpu_tests()
    if parts[0] == "checkpoint":
        return checkpoint_stall(smoke)
    return main_end_to_end(smoke)


# Most important first; with --budget the last ones are left out. Seconds each on an H200, estimated.
COSTS = {"train_ours_16x1024_compile": 60, "train_hf_16x1024_compile": 60, "decode_ours_1": 20, "decode_hf_1": 20,
         "tests_gpu": 40, "main_e2e": 60, "decode_ours_8": 20, "decode_hf_8": 20, "train_ours_8x512_compile": 45,
         "train_hf_8x512_compile": 45, "decode_hf_1_static": 60, "train_ours_16x1024_eager": 25,
         "train_hf_16x1024_eager": 25, "train_ours_8x512_eager": 20, "train_hf_8x512_eager": 20,
         "checkpoint_stall": 20}


def contenders(smoke: bool) -> list[str]:
    if smoke:
        _, shapes = sizes(smoke)
        names = [f"train_{kind}_{shape}_{mode}" for shape in shapes for mode in ("eager", "compile")
                 for kind in ("hf", "ours")]
        return names + [f"decode_{kind}_{batch}" for batch in (1, 8) for kind in ("hf", "ours")] + \
            ["decode_hf_1_static", "main_e2e", "checkpoint_stall"]
    return list(COSTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks every path, measures nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one contender in this process, print its JSON
    parser.add_argument("--budget", type=float, default=360,
                        help="seconds for the whole check; the least important parts are left out to fit")
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(one(args.one, args.smoke)))
        except Exception as error:  # a contender the installed versions cannot run is reported, not fatal
            print(json.dumps({"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}))
        return 0
    import torch

    from kogpt2.runtime import AttentionChoice

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (or --smoke to check the script)")
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    results, began = {}, time.perf_counter()
    out_file = REPO / "bench" / "gpu_results.json"
    for contender in contenders(args.smoke):
        left = args.budget - (time.perf_counter() - began)
        if not args.smoke and COSTS.get(contender, 30) > left:
            results[contender] = {"skipped": f"over --budget ({left:.0f} s left)"}
            print(f"{contender:28s} skipped: {left:.0f} s of the budget left", flush=True)
            continue
        started = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, "--one", contender, *(["--smoke"] if args.smoke else [])],
                                 capture_output=True, text=True, timeout=max(60, left) if not args.smoke else 900)
            lines = out.stdout.strip().splitlines()
            results[contender] = json.loads(lines[-1]) if lines else {"error": out.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            results[contender] = {"error": f"timed out after {time.perf_counter() - started:.0f} s"}
        if not args.smoke:  # written after each part: a check cut short still leaves what it measured
            out_file.write_text(json.dumps({"device": name, "partial": True, "results": results}, indent=1),
                                encoding="utf-8")
        if peak and "flops_per_token" in results[contender]:
            results[contender]["mfu"] = results[contender]["flops_per_token"] * results[contender]["tokens_per_s"] / peak
        got = results[contender]
        shown = got.get("error") or got.get("summary") or f"{got['tokens_per_s']:,.0f} tokens/s" + (
            f", MFU {got['mfu']:.1%}" if "mfu" in got else "") + (
            f", {got['graphs']} graph(s), {got['graph_breaks']} break(s), {got['recompiles']} recompile(s)"
            if "graphs" in got else "") + (
            f"; {AttentionChoice(**got['attention']).line()}" if "attention" in got else "")
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
        out_file.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    failed = [r for r in results.values() if "error" in r]
    if args.smoke:
        return 1 if [k for k, r in results.items() if "error" in r and k != "decode_hf_1_static"] else 0
    return 1 if failed or any(v["result"] == "FAIL" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
