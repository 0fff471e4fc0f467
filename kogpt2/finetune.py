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

from .corpus.packing import ChatCorpus, TextCorpus, open_corpus
from .corpus.reading import CsvFile
from .corpus.tokenizer import Tokenizer
from .defaults import FINETUNE_LR, LORA_LR, MAX_LEN, SCRATCH_LR
from .errors import KoGPT2Error
from .model.gpt import GPT
from .model.lora import LoraSettings, add_adapters
from .plot import plot_metrics
from .runtime import (
    cpu_bf16_instructions,
    keep_freed_memory,
    make_deterministic,
    pick_device,
    pick_precision,
    use_compile,
)
from .store.checkpoint import (
    BEST_NAME,
    BaseModel,
    RunOrigin,
    find_checkpoint,
    new_run,
    regular_checkpoints,
    run_of_file,
)
from .store.opening import OpenedModel, base_reference, open_checkpoint, open_model
from .store.pretrained import ReleaseUnavailable
from .store.scratch import is_scratch, scratch_model
from .train.distributed import World, join, leave
from .train.metrics_log import METRICS_NAME
from .train.optim import steps_per_epoch, warmup_steps
from .train.trainer import Trainer, TrainSettings

# Settings a resume takes from the checkpoint unless given again: with them the run continues exactly.
RESUMED_SETTINGS = ("max_len", "batch_size", "grad_accum", "lr", "warmup", "dropout", "val_ratio", "val_file", "seed",
                    "encoding", "format", "txt_unit", "column", "chat", "question_column", "answer_column",
                    "dialogue_column", "eval_every",
                    "save_every", "keep_last", "patience", "precision", "deterministic", "lora", "lora_alpha",
                    "lora_dropout", "lora_layers")


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
    opened = open_checkpoint(path, args.pretrained, merge=False)  # a LoRA run's adapters stay beside its base
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
    """A setting as it is typed on a command line: ``--max_len 64``, a switch alone (``--chat``), a list with commas."""
    if value is True:
        return f"--{name}"
    return f"--{name} {shlex.quote(','.join(value) if isinstance(value, (tuple, list)) else str(value))}"


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


DATA_SETTINGS = ("data_file_path", "val_file", "encoding", "format", "txt_unit")


def data_files(args: argparse.Namespace) -> tuple[CsvFile, CsvFile | None]:
    """The training file and the validation file (if any), read as ``args`` say."""
    def opened(path: str) -> CsvFile:
        return CsvFile(path, args.encoding, args.format, args.txt_unit)

    return opened(args.data_file_path), opened(args.val_file) if args.val_file else None


def corpus_of(csv: CsvFile, args: argparse.Namespace) -> TextCorpus | ChatCorpus:
    return open_corpus(csv, args.chat, args.column, args.question_column, args.answer_column, args.dialogue_column,
                       not args.no_cache, args.seed)


def _run(args: argparse.Namespace, world: World, device_name: str) -> int:
    """The steps of a run: open the data and the start, settle the run's settings, pack the data, train, finish."""
    say = print if world.is_main else (lambda *a, **k: None)
    keep_freed_memory()
    device = pick_device(device_name)
    train_csv, val_csv = data_files(args)  # checked before any model is loaded or downloaded
    check_save_path(args.save_path)
    resume = _start(args, say)
    run_id = resume.record.run if resume is not None and resume.record.ours else new_run()
    refuse_another_run(args.save_path, run_id, args.load_path)
    run = settings_of_run(args, resume, say)
    if [getattr(run, name) for name in DATA_SETTINGS] != [getattr(args, name) for name in DATA_SETTINGS]:
        train_csv, val_csv = data_files(run)  # a resume reads its data as its run did
    if run.deterministic:
        make_deterministic()
    torch.manual_seed(run.seed)  # a fresh model's initial weights, dropout: all follow --seed
    corpus = corpus_of(train_csv, run)
    model, tokenizer = _starting_model(run, resume, corpus, say)
    base = _frozen_base(run, resume, model)
    train_data, val_data = _packed(run, model, tokenizer, corpus, corpus_of(val_csv, run) if val_csv else None)
    trainer = _trainer(run, world, device, model, tokenizer, train_data, val_data, train_csv.sha256, corpus, run_id,
                       base, say)
    if resume is not None and resume.record.ours:
        trainer.restore(resume.record.training, resume.record.path)
    _describe(run, world, device, trainer, train_csv, corpus, train_data, val_data, say)
    if trainer.progress.epoch >= trainer.settings.epochs:
        say(f"nothing to do: the checkpoint already finished {plural(trainer.progress.epoch, 'epoch')} "
            "(raise --epoch to go on)")
        return 0
    last = trainer.fit()
    try:
        return _finish(trainer, last, say, world)
    except KeyboardInterrupt:
        say(f"interrupted; the last checkpoint is {last}" if last else "interrupted")
        return 130


def settings_of_run(args: argparse.Namespace, resume: OpenedModel | None, say) -> argparse.Namespace:
    """The run's settings, apart from the arguments as given: a resume's own (its origin, whose defaults it follows,
    and every setting not given again), and the learning rate its model calls for."""
    run = argparse.Namespace(**vars(args))
    if resume is not None and resume.record.ours:
        run.pretrained = resume.record.pretrained or run.pretrained
        take_checkpoint_settings(run, resume.record.args, getattr(args, "given", set()), say)
    if run.lr is None:
        run.lr = LORA_LR if run.lora else SCRATCH_LR if is_scratch(run.pretrained) else FINETUNE_LR
    if resume is not None and resume.record.ours and lora_settings(run) != resume.record.lora:
        adapters = (f"adapters of rank {resume.record.lora.rank}" if resume.record.lora
                    else "no adapters (every weight trains)")
        raise KoGPT2Error(f"{resume.source} has {adapters}, and a resume keeps them: drop the --lora flags, or start "
                          f"a new run from its weights: --pretrained {resume.source}")
    if run.lora and is_scratch(run.pretrained):
        raise KoGPT2Error(f"--lora trains adapters beside a pretrained model's frozen weights, and --pretrained "
                          f"{run.pretrained} has none to keep: drop --lora (every weight of a new model trains)")
    return run


def lora_settings(run: argparse.Namespace) -> LoraSettings | None:
    """The run's adapters (``--lora`` and its flags); None: full fine-tuning."""
    return LoraSettings(run.lora, run.lora_alpha, run.lora_dropout, tuple(run.lora_layers)) if run.lora else None


def _frozen_base(run: argparse.Namespace, resume: OpenedModel | None, model: GPT) -> BaseModel | None:
    """Where a LoRA run's frozen base is and its checksum, which every checkpoint of the run keeps; a new run's fresh
    adapters are put beside it here (a resume's model has its own already). None: full fine-tuning."""
    if resume is not None and resume.record.ours:
        return resume.record.base
    settings = lora_settings(run)
    if settings is None:
        return None
    base = base_reference(resume.source if resume is not None else run.pretrained, model)
    add_adapters(model, settings)
    return base


def _starting_model(run: argparse.Namespace, resume: OpenedModel | None, corpus, say) -> tuple[GPT, Tokenizer]:
    if resume is not None:
        if resume.record.ours:
            say(f"resuming from {resume.source}: step {resume.record.step}, epoch {resume.record.epoch + 1}")
        else:
            say(f"starting from the weights of the 2020 checkpoint {resume.source} (its optimizer state is not reused)")
        model, tokenizer = resume.model, resume.tokenizer
    elif is_scratch(run.pretrained):
        learn_from = corpus.texts(0 if run.val_file else run.val_ratio)
        model, tokenizer = scratch_model(run.pretrained, learn_from, run.vocab_size)
        say(f"training from scratch: {model.num_parameters() / 1e6:.1f}M parameters, "
            f"a tokenizer of {tokenizer.vocab_size} tokens learnt from {run.data_file_path}")
    else:
        try:
            opened = open_model(None, run.pretrained)
        except ReleaseUnavailable as error:
            raise KoGPT2Error(f"{error}, or train with no download at all: --pretrained scratch") from None
        model, tokenizer = opened.model, opened.tokenizer
        say(f"starting from the pretrained model {run.pretrained}")
    if run.dropout is not None:
        model.set_dropout(run.dropout)
    run.max_len = run.max_len or min(MAX_LEN, model.config.n_positions)
    if run.max_len > model.config.n_positions:
        raise KoGPT2Error(f"--max_len {run.max_len} is longer than the model's {model.config.n_positions} positions")
    return model, tokenizer


def _packed(run: argparse.Namespace, model: GPT, tokenizer: Tokenizer, corpus, val_corpus):
    """Training and validation blocks: the validation file's, else the rows ``--val_ratio`` holds out."""
    if val_corpus is not None:
        return corpus.pack(tokenizer, run.max_len, 0)[0], val_corpus.pack(tokenizer, run.max_len, 0)[0]
    return corpus.pack(tokenizer, run.max_len, run.val_ratio)


def _trainer(run: argparse.Namespace, world: World, device: torch.device, model: GPT, tokenizer: Tokenizer,
             train_data, val_data, data_sha256: str, corpus, run_id: str, base: BaseModel | None, say) -> Trainer:
    # recorded as resolved, so a resume (of any --epoch) goes on with the same steps, not a longer run's 5%
    run.warmup = warmup_steps(run.warmup, run.epoch * steps_per_epoch(len(train_data.blocks),
                                                                      run.batch_size * world.size, run.grad_accum))
    settings = TrainSettings(
        save_path=run.save_path, epochs=run.epoch, batch_size=run.batch_size, grad_accum=run.grad_accum,
        lr=run.lr, warmup=run.warmup, eval_every=run.eval_every, save_every=run.save_every,
        keep_last=run.keep_last, patience=run.patience, seed=run.seed, precision=pick_precision(run.precision, device),
        samples_dir=run.samples, tensorboard=run.tensorboard, chat=run.chat,
        compile=use_compile(run.compile, device), grad_checkpoint=run.grad_checkpoint)
    recorded_args = {k: v for k, v in vars(run).items() if k != "given"}
    origin = RunOrigin(run.data_file_path, data_sha256, corpus.column, run.pretrained, recorded_args,
                       "chat" if run.chat else "text", run_id, corpus.turns, lora_settings(run), base)
    return Trainer(model.to(device), tokenizer, train_data, val_data, settings, origin, log=say, world=world)


def _describe(run: argparse.Namespace, world: World, device: torch.device, trainer: Trainer, train_csv: CsvFile,
              corpus, train_data, val_data, say) -> None:
    """What the run is about to do, in a few lines."""
    settings = trainer.settings
    say(f"data: {plural(corpus.rows_read, 'row')} read ({train_csv.layout}), {corpus.rows_empty} empty skipped; "
        f"{train_data.rows} for training, {val_data.rows if val_data else 0} for validation; "
        f"{plural(train_data.tokens, 'training token')} in {plural(len(train_data.blocks), 'block')} of {run.max_len}"
        + (f"; {plural(train_data.rows_split, 'row')} longer than {run.max_len} tokens "
           f"{'cut to fit' if run.chat else 'split over blocks'}" if train_data.rows_split else ""))
    if run.dialogue_column:
        say(f"dialogues: {len(corpus.pairs.dialogues)} ('{run.dialogue_column}'), up to {corpus.turns} turns in one "
            f"example of {run.max_len} tokens; a chat keeps the last {corpus.turns - 1} turns as context by default")
    processes = f" x {world.size} processes = {trainer.global_batch}" if world.active else ""
    bf16_instructions = cpu_bf16_instructions() if device.type == "cpu" and settings.precision == "fp32" else []
    if bf16_instructions:
        say(f"tip: this CPU has bf16 instructions ({', '.join(bf16_instructions)}): --precision bf16 trains about "
            "1.8x faster on such CPUs with the same loss (bench/README.md)")
    if run.lora:
        trained = sum(p.numel() for p in trainer.trained)
        say(f"LoRA: rank {run.lora} (alpha {run.lora_alpha:g}, dropout {run.lora_dropout:g}) on "
            f"{','.join(run.lora_layers)}: {trained / 1e6:.2f}M trained parameters of "
            f"{trainer.model.num_parameters() / 1e6:.1f}M, the base frozen")
    extras = "".join(f", {name}" for name, on in (("compiled", settings.compile),
                                                  ("gradient checkpointing", settings.grad_checkpoint)) if on)
    say(f"training: {plural(settings.epochs, 'epoch')} x {plural(trainer.steps_per_epoch, 'step')} (batch "
        f"{settings.batch_size}{processes} x accumulation {settings.grad_accum}) on {device}, {settings.precision}"
        f"{extras}; checkpoints in {settings.save_path}")


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
