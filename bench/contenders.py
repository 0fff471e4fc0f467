"""One benchmark contender per process (so each peak RSS is its own): prints one JSON line.

    python bench/contenders.py train_ours_fp32
The baselines ("2020 loop", "transformers") are written here from the issue's description; they are not product code.
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
V2_TOKENIZER = REPO.parent / "shared" / "fixtures" / "kogpt2-v2" / "tokenizer.json"
SAMPLE = REPO / "data" / "sample.csv"
BATCH, BLOCK = 4, 128
TRAIN_STEPS, WARMUP_STEPS = 5, 2
NEW_TOKENS = 250
PROMPT = "오늘 아침에는"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tokenizer():
    from kogpt2.corpus.tokenizer import load_tokenizer

    return load_tokenizer(V2_TOKENIZER)


def sample_texts() -> list[str]:
    with SAMPLE.open(encoding="utf-8") as f:
        return [row["sent"] for row in csv.DictReader(f)]


def packed_blocks(tok):
    from kogpt2.corpus.packing import pack
    from kogpt2.corpus.reading import tokenize_rows

    return pack(tokenize_rows(sample_texts(), tok), BLOCK, tok.pad_id)


def hf_model(torch):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12, bos_token_id=0,
                        eos_token_id=1, pad_token_id=3, activation_function="gelu_new", attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def our_model(torch):
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig())


# ---- training -------------------------------------------------------------------------------------------------

def train_2020() -> dict:
    """One sentence per step, model(ids, labels=ids), Adam(lr=3e-5): what the original did."""
    import torch

    tok = tokenizer()
    rows = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in sample_texts()]
    model = hf_model(torch).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-5)
    steps, tokens = 12, 0
    for i in range(steps + WARMUP_STEPS):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        ids = torch.tensor([rows[i]])
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += len(rows[i]) - 1 if i >= WARMUP_STEPS else 0
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "peak_rss_gib": peak_rss_gib()}


def train_transformers(precision: str = "fp32") -> dict:
    import torch

    tok = tokenizer()
    data = packed_blocks(tok)
    model = hf_model(torch).train()
    # what transformers' Trainer uses by default since torch 2.8 ("adamw_torch_fused"), and its gradient clipping
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True)
    losses, tokens = [], 0
    for i in range(TRAIN_STEPS + WARMUP_STEPS):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        blocks = data.blocks[i * BATCH:(i + 1) * BATCH]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=blocks[:, :-1], labels=blocks[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += blocks[:, 1:].numel() if i >= WARMUP_STEPS else 0
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "peak_rss_gib": peak_rss_gib(), "losses": losses}


BENCH_LORA = 8  # --lora 8 with the default alpha, dropout and layers


def lora_model_and_origin(torch, base_folder: Path | None = None):
    """Our model with rank-8 adapters beside its frozen weights, and the run origin that names its base (saved as a
    Hugging Face folder in ``base_folder`` when given, so that an adapter checkpoint can open it again)."""
    from kogpt2.defaults import LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS
    from kogpt2.model.lora import LoraSettings, add_adapters
    from kogpt2.store.checkpoint import BaseModel, RunOrigin
    from kogpt2.store.opening import base_reference

    model = our_model(torch)
    base = BaseModel("none", "hub", "")
    if base_folder is not None:
        save_hf_folder(model, base_folder)
        base = base_reference(str(base_folder), model)
    settings = LoraSettings(BENCH_LORA, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS)
    add_adapters(model, settings)
    return model, RunOrigin("random blocks", "", "sent", "none", {}, "text", "bench", lora=settings, base=base)


def save_hf_folder(model, folder: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    from kogpt2.model.hf_layout import hf_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**model.config.to_hf(), "bos_token_id": 0, "eos_token_id": 1}))
    save_file({k: v.contiguous() for k, v in hf_state_dict(model).items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    shutil.copy(V2_TOKENIZER, folder / "tokenizer.json")


def train_ours(precision: str, compiled: bool = False, lora: bool = False) -> dict:
    """The product's own loop (Trainer) with its own allocator setting, on the same blocks; ``lora``: --lora 8 at
    its default rate."""
    import torch

    from kogpt2.defaults import LORA_LR
    from kogpt2.runtime import keep_freed_memory
    from kogpt2.store.checkpoint import RunOrigin, generation_payload, load_checkpoint, save_checkpoint
    from kogpt2.train.trainer import Trainer, TrainSettings

    keep_freed_memory()
    tok = tokenizer()
    data = packed_blocks(tok)
    with tempfile.TemporaryDirectory() as folder:
        model, origin = lora_model_and_origin(torch) if lora else \
            (our_model(torch), RunOrigin("random blocks", "", "sent", "none", {}, "text", "bench"))
        trainer = Trainer(model, tok, data, None, TrainSettings(save_path=folder, batch_size=BATCH,
                          precision=precision, lr=LORA_LR if lora else 3e-5, warmup=0, compile=compiled), origin=origin)
        trainer.model.train()
        losses, tokens = [], 0
        for i in range(TRAIN_STEPS + WARMUP_STEPS):
            if i == WARMUP_STEPS:
                start = time.perf_counter()
            loss, n, _ = trainer._step([torch.arange(i * BATCH, (i + 1) * BATCH)], False)
            trainer.progress.step += 1
            losses.append(loss)
            tokens += n if i >= WARMUP_STEPS else 0
        elapsed = time.perf_counter() - start
        result = {"tokens_per_s": tokens / elapsed, "peak_rss_gib": peak_rss_gib(), "losses": losses}  # before saving
        if lora:
            result["checkpoint_mb"] = trainer.save().stat().st_size / 1e6
        elif precision == "fp32" and not compiled:
            path = trainer.save()
            result["checkpoint_gib"] = path.stat().st_size / 2**30
            slim = Path(folder) / "generate.tar"
            save_checkpoint(slim, generation_payload(load_checkpoint(path)))
            result["generation_file_mb"] = slim.stat().st_size / 1e6
            started = time.perf_counter()
            from generator import main as generator_main

            code = generator_main(["--load_path", str(slim), "--tmp_sent", PROMPT, "--text_size", "3", "--loops", "1"])
            result["generation_file_loads"] = code == 0
            result["generation_file_load_s"] = time.perf_counter() - started
    return result


# ---- generation -----------------------------------------------------------------------------------------------

def gen_2020() -> dict:
    """Re-tokenise the whole text and run the full sequence for every new token (no KV cache)."""
    import torch

    from kogpt2.generation.sampling import sample_next

    tok = tokenizer()
    model = hf_model(torch).eval()
    generator = torch.Generator().manual_seed(0)
    text, produced = PROMPT, 0
    start = time.perf_counter()
    with torch.no_grad():
        while produced < NEW_TOKENS:
            ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
            logits = model(ids).logits[:, -1]
            token = sample_next(logits, 1.0, 40, 0.9, generator).item()
            text += tok.decode([token])
            produced += 1
    return {"tokens_per_s": produced / (time.perf_counter() - start), "peak_rss_gib": peak_rss_gib()}


def gen_transformers() -> dict:
    import torch

    tok = tokenizer()
    model = hf_model(torch).eval()
    ids = torch.tensor([[tok.bos_id] + tok.encode(PROMPT)])
    torch.manual_seed(0)
    model.generate(ids, do_sample=True, top_k=40, top_p=0.9, max_new_tokens=5, min_new_tokens=5, pad_token_id=3)
    start = time.perf_counter()
    out = model.generate(ids, do_sample=True, top_k=40, top_p=0.9, temperature=1.0, use_cache=True,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=3)
    produced = out.shape[1] - ids.shape[1]
    return {"tokens_per_s": produced / (time.perf_counter() - start), "peak_rss_gib": peak_rss_gib()}


def gen_ours(dtype: str = "fp32", num_samples: int = 1, model=None) -> dict:
    """The product's generation path: KV cache, sampling filters and streaming decode of every sample."""
    import torch

    from kogpt2.defaults import SamplingSettings
    from kogpt2.generation.engine import TextStream, TokenList, generate_ids, never_generated
    from kogpt2.store.opening import DTYPES

    tok = tokenizer()
    model = (our_model(torch) if model is None else model).to(DTYPES[dtype]).eval()
    prompt = [tok.bos_id] + tok.encode(PROMPT)
    settings = SamplingSettings(temperature=1.0, top_k=40, top_p=0.9, text_size=NEW_TOKENS)
    for warm in (True, False):
        samples, streams = [TokenList() for _ in range(num_samples)], [TextStream(tok, prompt) for _ in range(num_samples)]
        start = time.perf_counter()
        produced = 0
        for index in generate_ids(model, prompt, settings if not warm else SamplingSettings(text_size=5), samples,
                                  torch.Generator().manual_seed(0), never_generated(tok)):
            streams[index].push(samples[index].ids[-1])
            produced += 1
    return {"tokens_per_s": produced / (time.perf_counter() - start), "peak_rss_gib": peak_rss_gib()}


def gen_ours_lora() -> dict:
    """Generation from an adapter checkpoint as generator.py opens it (the base found, checked, the adapters merged
    once), on the same path as ``gen_ours``; the adapters are random, so the merge changes every projection."""
    import torch

    from kogpt2.model.lora import adapted_layers
    from kogpt2.store.opening import open_model
    from kogpt2.train.trainer import Trainer, TrainSettings

    with tempfile.TemporaryDirectory() as folder:
        model, origin = lora_model_and_origin(torch, Path(folder) / "base")
        for layer in adapted_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.02)
        tok = tokenizer()
        path = Trainer(model, tok, packed_blocks(tok), None, TrainSettings(save_path=str(Path(folder) / "run")),
                       origin=origin).save()
        del model
        started = time.perf_counter()
        opened = open_model(str(path))
        open_s = time.perf_counter() - started
        return {**gen_ours("fp32", model=opened.model), "open_s": open_s, "checkpoint_mb": path.stat().st_size / 1e6}


QUALITY_RUN = ("--max_len", "64", "--batch_size", "4", "--epoch", "4", "--eval_every", "10", "--seed", "1")


def quality_lora() -> dict:
    """Validation loss on the sample data after the same tokens, full fine-tuning (its default rate) against
    --lora 8 (its own), both from one base: a small GPT-2 (scratch:small) first trained on other Korean text (the
    chat samples' questions and answers), as no KoGPT2 weights are here. All through main.py."""
    import io
    from contextlib import redirect_stdout

    import main

    texts = []
    for name in ("chat_sample.csv", "dialogue_sample.csv"):
        with (REPO / "data" / name).open(encoding="utf-8") as f:
            texts += [text for row in csv.DictReader(f) for text in (row["Q"], row["A"])]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        other = folder / "other.csv"
        with other.open("w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([["sent"], *([t] for t in texts)])

        def train(*argv: str) -> list[dict]:
            save = folder / str(len(list(folder.iterdir())))
            with redirect_stdout(io.StringIO()):
                assert main.main([*argv, "--save_path", str(save)]) == 0
            return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]

        train("--pretrained", "scratch:small", "--data_file_path", str(other), "--epoch", "15", "--max_len", "64",
              "--val_ratio", "0", "--seed", "1")
        base = str(next(folder.glob("*/KoGPT2_checkpoint_*.tar")))
        runs = {name: train("--pretrained", base, "--data_file_path", str(SAMPLE), *QUALITY_RUN, *extra)
                for name, extra in (("full", ()), ("lora8", ("--lora", str(BENCH_LORA))))}
    curve = {name: [(m["step"], round(m["val_loss"], 4)) for m in metrics if "val_loss" in m]
             for name, metrics in runs.items()}
    return {"val_loss": curve, "tokens_per_step": BATCH * 64, "peak_rss_gib": peak_rss_gib(),
            "run_tokens_per_s": {name: metrics[-1]["tokens_per_s"] for name, metrics in runs.items()}}


# ---- data and start-up -------------------------------------------------------------------------------------------

def big_csv(path: Path, rows: int = 1_000_000) -> None:
    import random

    words = sorted({w for t in sample_texts() for w in t.split()})
    rng = random.Random(0)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["score", "genre", "sent"])
        for i in range(rows):
            writer.writerow([i % 5, "x", " ".join(rng.choices(words, k=rng.randint(3, 12)))])


def data_load(csv_path: str) -> dict:
    """Read, tokenise and pack a CSV (the cache next to it is used if present)."""
    from kogpt2.corpus.packing import pack
    from kogpt2.corpus.reading import CsvColumn

    start = time.perf_counter()
    tok = tokenizer()
    rows = CsvColumn(csv_path).token_rows(tok)
    packed = pack(rows, BLOCK, tok.pad_id)
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib(), "rows": len(rows),
            "blocks": len(packed.blocks)}


CONTENDERS = {
    "train_2020": train_2020,
    "train_transformers": train_transformers,
    "train_ours_fp32": lambda: train_ours("fp32"),
    "train_ours_bf16": lambda: train_ours("bf16"),
    "train_ours_fp32_compile": lambda: train_ours("fp32", compiled=True),
    "train_ours_lora8": lambda: train_ours("fp32", lora=True),
    "gen_2020": gen_2020,
    "gen_transformers": gen_transformers,
    "gen_ours_fp32": lambda: gen_ours("fp32"),
    "gen_ours_bf16": lambda: gen_ours("bf16"),
    "gen_ours_fp32_x8": lambda: gen_ours("fp32", 8),
    "gen_ours_lora8": gen_ours_lora,
    "quality_lora": quality_lora,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=[*CONTENDERS, "data_load", "big_csv"])
    parser.add_argument("path", nargs="?")
    args = parser.parse_args()
    if args.name == "big_csv":
        big_csv(Path(args.path))
        result = {}
    elif args.name == "data_load":
        result = data_load(args.path)
    else:
        result = CONTENDERS[args.name]()
    print("RESULT " + json.dumps(result))
