"""What ``main.py`` does: pick the start (checkpoint, pretrained release or scratch), load the CSV, train."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import is_ours, load_checkpoint, model_from_checkpoint, regular_checkpoints
from .data import check_header, load_rows, pack, read_text_column, validation_mask
from .distributed import World, join, leave
from .errors import KoGPT2Error
from .plot import plot_metrics
from .pretrained import load_pretrained, load_pretrained_tokenizer
from .runtime import cpu_bf16_instructions, keep_freed_memory, pick_device, pick_precision
from .scratch import is_scratch, scratch_model
from .train import Trainer, TrainSettings

FINETUNE_LR = 3e-5  # the original's
SCRATCH_LR = 1e-3  # a fresh small model learns nothing at a fine-tuning rate


def run(args: argparse.Namespace) -> int:
    world, device_name = join(args.device)
    try:
        return _run(args, world, device_name)
    finally:
        leave(world)


def newest_checkpoint(folder: Path) -> Path | None:
    found = regular_checkpoints(folder)
    return found[-1][1] if found else None


def _run(args: argparse.Namespace, world: World, device_name: str) -> int:
    say = print if world.is_main else (lambda *a, **k: None)
    keep_freed_memory()
    torch.manual_seed(args.seed)  # a fresh model's initial weights, dropout: all follow --seed
    device = pick_device(device_name)
    precision = pick_precision(args.precision, device)
    for csv_path in filter(None, (args.data_file_path, args.val_file)):  # before any model is loaded or downloaded
        check_header(csv_path, args.column, args.encoding)
    resume, column = None, None
    load_path = Path(args.load_path) if args.load_path else None
    if load_path is not None and load_path.is_dir():  # the newest checkpoint in it: what an elastic restart wants
        folder, load_path = load_path, newest_checkpoint(load_path)
        if load_path is None:
            say(f"no checkpoint in {folder} yet")
    if load_path is not None and load_path.exists():
        payload = load_checkpoint(load_path)
        if is_ours(payload):
            model, tokenizer = model_from_checkpoint(payload, load_path)
            resume = payload
            say(f"resuming from {load_path}: step {payload['progress']['step']}, epoch {payload['progress']['epoch'] + 1}")
        else:
            model, tokenizer = model_from_checkpoint(payload, load_path, load_pretrained_tokenizer(args.pretrained))
            say(f"starting from the weights of the 2020 checkpoint {load_path} (its optimizer state is not reused)")
    else:
        if load_path is not None:
            say(f"{load_path} does not exist yet: starting from {args.pretrained}")
        if is_scratch(args.pretrained):
            column = read_text_column(args.data_file_path, args.column, args.encoding)
            learn_from = [t for t, val in zip(column.texts, validation_mask(len(column.texts), args.val_ratio, args.seed))
                          if not val or args.val_file]
            model, tokenizer = scratch_model(args.pretrained, learn_from, args.vocab_size)
            say(f"training from scratch: {model.num_parameters() / 1e6:.1f}M parameters, "
                f"a tokenizer of {tokenizer.vocab_size} tokens learnt from {args.data_file_path}")
        else:
            model, tokenizer = load_pretrained(args.pretrained)
            say(f"starting from the pretrained model {args.pretrained}")

    if args.dropout is not None:
        model.set_dropout(args.dropout)
    max_len = args.max_len or min(256, model.config.n_positions)
    if max_len > model.config.n_positions:
        raise KoGPT2Error(f"--max_len {max_len} is longer than the model's {model.config.n_positions} positions")
    rows, data = load_rows(args.data_file_path, args.column, args.encoding, tokenizer, parsed=column)
    if args.val_file:
        val_rows, _ = load_rows(args.val_file, args.column, args.encoding, tokenizer)
        train_data, val_data = pack(rows, max_len, tokenizer.pad_id), pack(val_rows, max_len, tokenizer.pad_id)
    else:
        val = validation_mask(len(rows), args.val_ratio, args.seed)
        train_data = pack(rows, max_len, tokenizer.pad_id, ~val)
        val_data = pack(rows, max_len, tokenizer.pad_id, val) if val.any() else None
    settings = TrainSettings(
        save_path=args.save_path, epochs=args.epoch, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else (SCRATCH_LR if is_scratch(args.pretrained) else FINETUNE_LR),
        warmup=args.warmup, eval_every=args.eval_every, save_every=args.save_every,
        keep_last=args.keep_last, patience=args.patience, seed=args.seed, precision=precision,
        samples_dir=args.samples, tensorboard=args.tensorboard)
    record = {"data": {"path": str(args.data_file_path), "sha256": data.sha256, "column": args.column},
              "pretrained": args.pretrained, "args": {k: v for k, v in vars(args).items() if v is not None}}
    trainer = Trainer(model.to(device), tokenizer, train_data, val_data, settings, record, log=say, world=world)
    if resume is not None:
        trainer.restore(resume)

    say(f"data: {data.rows_read} rows read ({data.encoding}), {data.rows_empty} empty skipped; "
        f"{train_data.rows} for training, {val_data.rows if val_data else 0} for validation; "
        f"{train_data.tokens} training tokens in {len(train_data.blocks)} blocks of {max_len}"
        + (f"; {train_data.rows_split} rows longer than {max_len} tokens split over blocks" if train_data.rows_split else ""))
    processes = f" x {world.size} processes = {trainer.global_batch}" if world.active else ""
    bf16_instructions = cpu_bf16_instructions() if device.type == "cpu" and precision == "fp32" else []
    if bf16_instructions:
        say(f"tip: this CPU has bf16 instructions ({', '.join(bf16_instructions)}): --precision bf16 trains about "
            "1.8x faster on such CPUs with the same loss (bench/README.md)")
    say(f"training: {settings.epochs} epochs x {trainer.steps_per_epoch} steps (batch {settings.batch_size}{processes} x "
        f"accumulation {settings.grad_accum}) on {device}, {precision}; checkpoints in {settings.save_path}")
    if trainer.progress.epoch >= settings.epochs:
        say(f"nothing to do: the checkpoint already finished {trainer.progress.epoch} epochs (raise --epoch to go on)")
        return 0
    last = trainer.fit()
    if last is not None:
        say(f"last checkpoint: {last}")
    if world.is_main and trainer.metrics_path.exists():
        say(f"loss curve: {plot_metrics(settings.save_path)}")
    return 0
