"""What ``main.py`` does: pick the start (checkpoint, pretrained release, a model file, or scratch), load the CSV,
train."""
from __future__ import annotations

import argparse
import contextlib
import shlex
import tempfile
import traceback
from pathlib import Path

import torch

from .store.checkpoint import BEST_NAME, find_checkpoint, new_run, regular_checkpoints, run_of_file, source_record
from .corpus.reading import CsvFile
from .defaults import FINETUNE_LR, MAX_LEN, SCRATCH_LR
from .train.distributed import World, join, leave
from .errors import KoGPT2Error
from .store.opening import OpenedModel, open_checkpoint, open_model
from .train.metrics_log import METRICS_NAME
from .train.optim import steps_per_epoch, warmup_steps
from .corpus.packing import Corpus
from .plot import plot_metrics
from .store.pretrained import ReleaseUnavailable
from .runtime import cpu_bf16_instructions, keep_freed_memory, make_deterministic, pick_device, pick_precision, use_compile
from .store.scratch import is_scratch, scratch_model
from .train.trainer import Trainer, TrainSettings

# Settings a resume takes from the checkpoint unless given again: with them the run continues exactly.
RESUMED_SETTINGS = ("max_len", "batch_size", "grad_accum", "lr", "warmup", "dropout", "val_ratio", "val_file", "seed",
                    "column", "chat", "question_column", "answer_column", "dialogue_column", "eval_every",
                    "save_every", "keep_last", "patience", "precision", "deterministic")


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def run(args: argparse.Namespace) -> int:
    world, device_name = join(args.device, args.dist_timeout)
    try:
        return _run(args, world, device_name)
    except BaseException as error:
        # A failing rank's traceback would keep the trainer (and its DDP wrapper) alive past the process group's
        # end, and Gloo then aborts at exit: free the frames' locals first (the traceback itself stays printable).
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        leave(world)


def check_save_path(save_path: str) -> None:
    """Before any work: a --save_path that is a file (a CSV, a .tar) or a folder that cannot be made or written to
    would otherwise fail at the first checkpoint, after the training it was to keep."""
    folder = Path(save_path)
    if folder.exists() and not folder.is_dir():
        tar = f"; to continue from this checkpoint, use --load_path {save_path}" if folder.suffix == ".tar" else ""
        raise KoGPT2Error(f"--save_path {save_path} is a file, not a folder: give the folder for the checkpoints and "
                          f"metrics (e.g. --save_path checkpoint/){tar}")
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first; removed again below
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise KoGPT2Error(f"--save_path {save_path}: cannot write there ({error.strerror}); give a folder you can "
                          "write to") from None
    finally:
        for path in made:  # a run that stops before training leaves no empty folder behind
            with contextlib.suppress(OSError):
                path.rmdir()


def _start(args: argparse.Namespace, say) -> OpenedModel | None:
    """The checkpoint to resume, if any."""
    if not args.load_path:
        return None
    path = find_checkpoint(args.load_path, prefer_best=False)
    if path is None:
        say(f"no checkpoint in {args.load_path} yet")
        return None
    if not path.exists():
        say(f"{path} does not exist yet: starting from {args.pretrained}")
        return None
    opened = open_checkpoint(path, args.pretrained)
    if opened.record.ours and not opened.record.resumable:
        raise KoGPT2Error(f"{path} holds a model but no training state (a file written by kogpt2.export), so a run "
                          f"cannot resume from it; start a new run from its weights: --pretrained {path}")
    return opened


def refuse_another_run(save_path: str, run: str, load_path: str | None) -> None:
    """A run writes into a new folder or its own: another run's checkpoints would be overwritten or rotated away and
    its metrics mixed with these. Metrics with no checkpoint are a run that never saved: restarting it (--load_path
    of that folder) starts over."""
    folder = Path(save_path)
    if not folder.is_dir():
        return
    checkpoints = [path for _, path in regular_checkpoints(folder)] + [p for p in [folder / BEST_NAME] if p.is_file()]
    if checkpoints:
        others = [path for path in checkpoints if run_of_file(path) != run]
    else:
        restarting = load_path is not None and Path(load_path).resolve() == folder.resolve()
        others = [folder / METRICS_NAME] if (folder / METRICS_NAME).is_file() and not restarting else []
    if others:
        names = ", ".join([path.name for path in others[:2]] + ["..."] * (len(others) > 2))
        raise KoGPT2Error(f"--save_path {save_path} already holds another training run ({names}): continue that run "
                          f"with --load_path {save_path}, or give this one a fresh --save_path")


def as_flag(name: str, value) -> str:
    """A setting as it is typed on a command line: ``--max_len 64``, a switch alone (``--chat``)."""
    return f"--{name}" if value is True else f"--{name} {shlex.quote(str(value))}"


def take_checkpoint_settings(args: argparse.Namespace, recorded: dict, given: set[str], say) -> None:
    """A resume continues with the checkpoint's settings unless the user gives new ones; both are said."""
    taken, changed = [], []
    for name in RESUMED_SETTINGS:
        if name not in recorded:
            continue
        if name in given:
            if getattr(args, name) != recorded[name]:
                was = "off" if recorded[name] is False else recorded[name]
                changed.append(f"{as_flag(name, getattr(args, name))} (was {was})")
        elif getattr(args, name) != recorded[name]:
            setattr(args, name, recorded[name])
            taken.append(as_flag(name, recorded[name]))
    if taken:
        say(f"resuming with the checkpoint's settings: {' '.join(taken)}")
    if changed:
        say(f"note: new settings {', '.join(changed)}: the run goes on with them, so it will not match an "
            "uninterrupted run exactly")


def corpus_of(csv: CsvFile, args: argparse.Namespace) -> Corpus:
    return Corpus(csv, args.column, args.chat, args.question_column, args.answer_column, not args.no_cache, args.seed,
                  args.dialogue_column)


def _run(args: argparse.Namespace, world: World, device_name: str) -> int:
    say = print if world.is_main else (lambda *a, **k: None)
    keep_freed_memory()
    device = pick_device(device_name)
    # checked before any model is loaded or downloaded
    train_csv = CsvFile(args.data_file_path, args.encoding, args.format, args.txt_unit)
    val_csv = CsvFile(args.val_file, args.encoding, args.format, args.txt_unit) if args.val_file else None
    check_save_path(args.save_path)
    resume = _start(args, say)
    continuing = resume is not None and resume.record.ours
    run = resume.record.run if continuing else new_run()
    refuse_another_run(args.save_path, run, args.load_path)
    if continuing:
        args.pretrained = resume.record.pretrained or args.pretrained  # the run's origin, which its defaults follow
        take_checkpoint_settings(args, resume.record.args, getattr(args, "given", set()), say)
    if args.lr is None:
        args.lr = SCRATCH_LR if is_scratch(args.pretrained) else FINETUNE_LR
    if args.deterministic:
        make_deterministic()
    torch.manual_seed(args.seed)  # a fresh model's initial weights, dropout: all follow --seed
    precision = pick_precision(args.precision, device)
    corpus = corpus_of(train_csv, args)
    val_corpus = corpus_of(val_csv, args) if val_csv else None

    if resume is not None:
        model, tokenizer = resume.model, resume.tokenizer
        if resume.record.ours:
            say(f"resuming from {resume.source}: step {resume.record.step}, epoch {resume.record.epoch + 1}")
        else:
            say(f"starting from the weights of the 2020 checkpoint {resume.source} (its optimizer state is not reused)")
    elif is_scratch(args.pretrained):
        learn_from = corpus.texts(0 if args.val_file else args.val_ratio)
        model, tokenizer = scratch_model(args.pretrained, learn_from, args.vocab_size)
        say(f"training from scratch: {model.num_parameters() / 1e6:.1f}M parameters, "
            f"a tokenizer of {tokenizer.vocab_size} tokens learnt from {args.data_file_path}")
    else:
        try:
            opened = open_model(None, args.pretrained)
        except ReleaseUnavailable as error:
            raise KoGPT2Error(f"{error}, or train with no download at all: --pretrained scratch") from None
        model, tokenizer = opened.model, opened.tokenizer
        say(f"starting from the pretrained model {args.pretrained}")

    if args.dropout is not None:
        model.set_dropout(args.dropout)
    args.max_len = args.max_len or min(MAX_LEN, model.config.n_positions)
    if args.max_len > model.config.n_positions:
        raise KoGPT2Error(f"--max_len {args.max_len} is longer than the model's {model.config.n_positions} positions")
    if val_corpus is not None:
        train_data, _ = corpus.pack(tokenizer, args.max_len, 0)
        val_data, _ = val_corpus.pack(tokenizer, args.max_len, 0)
    else:
        train_data, val_data = corpus.pack(tokenizer, args.max_len, args.val_ratio)
    # recorded as resolved, so a resume (of any --epoch) goes on with the same steps, not a longer run's 5%
    args.warmup = warmup_steps(args.warmup, args.epoch * steps_per_epoch(len(train_data.blocks),
                                                                         args.batch_size * world.size, args.grad_accum))
    settings = TrainSettings(
        save_path=args.save_path, epochs=args.epoch, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup=args.warmup, eval_every=args.eval_every, save_every=args.save_every,
        keep_last=args.keep_last, patience=args.patience, seed=args.seed, precision=precision,
        samples_dir=args.samples, tensorboard=args.tensorboard, chat=args.chat,
        compile=use_compile(args.compile, device), grad_checkpoint=args.grad_checkpoint)
    recorded_args = {k: v for k, v in vars(args).items() if k != "given"}
    source = source_record(args.data_file_path, train_csv.sha256, corpus.column, args.pretrained, recorded_args,
                           "chat" if args.chat else "text", run, corpus.turns)
    trainer = Trainer(model.to(device), tokenizer, train_data, val_data, settings, source, log=say, world=world)
    if resume is not None and resume.record.ours:
        trainer.restore(resume.record.training, resume.record.path)

    say(f"data: {plural(corpus.rows_read, 'row')} read ({train_csv.layout}), {corpus.rows_empty} empty skipped; "
        f"{train_data.rows} for training, {val_data.rows if val_data else 0} for validation; "
        f"{plural(train_data.tokens, 'training token')} in {plural(len(train_data.blocks), 'block')} of {args.max_len}"
        + (f"; {plural(train_data.rows_split, 'row')} longer than {args.max_len} tokens "
           f"{'cut to fit' if args.chat else 'split over blocks'}" if train_data.rows_split else ""))
    if args.dialogue_column:
        say(f"dialogues: {len(corpus.pairs.dialogues)} ('{args.dialogue_column}'), up to {corpus.turns} turns in one "
            f"example of {args.max_len} tokens; a chat keeps the last {corpus.turns - 1} turns as context by default")
    processes = f" x {world.size} processes = {trainer.global_batch}" if world.active else ""
    bf16_instructions = cpu_bf16_instructions() if device.type == "cpu" and precision == "fp32" else []
    if bf16_instructions:
        say(f"tip: this CPU has bf16 instructions ({', '.join(bf16_instructions)}): --precision bf16 trains about "
            "1.8x faster on such CPUs with the same loss (bench/README.md)")
    extras = "".join(f", {name}" for name, on in (("compiled", settings.compile),
                                                  ("gradient checkpointing", settings.grad_checkpoint)) if on)
    say(f"training: {plural(settings.epochs, 'epoch')} x {plural(trainer.steps_per_epoch, 'step')} (batch "
        f"{settings.batch_size}{processes} x accumulation {settings.grad_accum}) on {device}, {precision}{extras}; "
        f"checkpoints in {settings.save_path}")
    if trainer.progress.epoch >= settings.epochs:
        say(f"nothing to do: the checkpoint already finished {plural(trainer.progress.epoch, 'epoch')} "
            "(raise --epoch to go on)")
        return 0
    last = trainer.fit()
    try:
        return _finish(trainer, last, say, world)
    except KeyboardInterrupt:
        say(f"interrupted; the last checkpoint is {last}" if last else "interrupted")
        return 130


def _finish(trainer: Trainer, last: Path | None, say, world: World) -> int:
    if last is not None:
        say(f"last checkpoint: {last}")
    best = trainer.save_path / BEST_NAME
    if trainer.progress.best_step and best.is_file():
        say(f"best checkpoint: {best} (step {trainer.progress.best_step}, validation loss "
            f"{trainer.progress.best_val_loss:.4f})")
    if trainer.metrics is not None and trainer.metrics.path.exists():
        say(f"loss curve: {plot_metrics(trainer.settings.save_path)}")
    return 0
