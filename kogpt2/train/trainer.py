"""The fine-tuning loop: packed batches, AdamW with warmup and cosine decay, exact resume, safe stops."""
from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..corpus.packing import Batch, PackedData, epoch_order
from ..corpus.tokenizer import Tokenizer
from ..defaults import (
    BATCH_SIZE,
    CLIP,
    EPOCHS,
    EVAL_EVERY,
    FINETUNE_LR,
    GRAD_ACCUM,
    KEEP_LAST,
    PATIENCE,
    SAVE_EVERY,
    SAVE_PATH,
    SEED,
    TRAINING_SAMPLE_PHRASE,
    WARMUP,
    WEIGHT_DECAY,
)
from ..errors import KoGPT2Error
from ..generation.engine import fixed_sample
from ..model.gpt import GPT
from ..model.head_loss import IGNORE_INDEX
from ..runtime import AttentionChoice, HostCopy, choose_attention_kernel, sum_dtype
from ..store.checkpoint import (
    BEST_NAME,
    CheckpointWriter,
    RunOrigin,
    TrainingState,
    checkpoint_name,
    link_checkpoint,
    remove_stale_temporaries,
    resume_hint,
    rotate,
    training_payload,
)
from .batch_loss import AUTOCAST_DTYPES, batch_loss_sum, evaluate
from .distributed import World
from .metrics_log import MetricsLog
from .optim import learning_rate, make_optimizer, steps_per_epoch
from .safe_stop import StopRequest


@dataclass
class TrainSettings:
    save_path: str = SAVE_PATH
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    grad_accum: int = GRAD_ACCUM
    lr: float = FINETUNE_LR
    warmup: int = WARMUP  # optimizer steps; -1: 5% of the run
    weight_decay: float = WEIGHT_DECAY
    clip: float = CLIP
    eval_every: int = EVAL_EVERY  # optimizer steps; 0: at each epoch end
    save_every: int = SAVE_EVERY
    keep_last: int = KEEP_LAST
    patience: int = PATIENCE  # evaluations without a better validation loss before stopping; 0: never stop early
    seed: int = SEED
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast with a gradient scaler)
    compile: bool = False  # torch.compile the training forward (falls back to eager if compiling fails)
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass: less memory
    sample_phrase: str = TRAINING_SAMPLE_PHRASE
    chat: bool = False  # samples answer defaults.TRAINING_SAMPLE_QUESTION instead
    samples_dir: str | None = None
    tensorboard: bool = False


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    loss: float = math.nan


class Trainer:
    def __init__(self, model: GPT, tokenizer: Tokenizer, train_data: PackedData, val_data: PackedData | None,
                 settings: TrainSettings, origin: RunOrigin, log=print, world: World = World()) -> None:
        """``origin`` (data, arguments, pretrained model, the run's identity) goes into every checkpoint.

        Under torchrun each step's global batch of ``batch_size x world.size`` blocks is split between the ranks,
        so N processes follow the same path as one process with an N times larger batch."""
        self.model, self.tokenizer, self.settings, self.origin, self.world = model, tokenizer, settings, origin, world
        self.log = log if world.is_main else (lambda *args, **kwargs: None)
        self.train_data, self.val_data = train_data, val_data
        self.device = next(model.parameters()).device
        model.grad_checkpoint = settings.grad_checkpoint
        self.attention = self._choose_attention_kernel()
        model.tied_grad.in_place = not world.active  # DDP's hooks need every gradient to flow through autograd
        self.ddp = None
        if world.active:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.eager_model = self.ddp or model
        # Compiled, the step is one graph of fixed shapes: plain autograd for the tied weight, the head's traceable
        # chunked loss (Dynamo cannot trace the CPU's in-place paths), and every batch padded to the same rows.
        model.plain_autograd = settings.compile
        self.forward_model = torch.compile(self.eager_model, dynamic=False) if settings.compile else self.eager_model
        self.compile_checked = not settings.compile
        # A LoRA run's frozen base is no part of the optimizer: no moments, no update, no gradient to clip.
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trained, settings.lr, settings.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.progress = Progress()
        self.save_path = Path(settings.save_path)
        self.global_batch = settings.batch_size * world.size
        self.steps_per_epoch = steps_per_epoch(len(train_data.blocks), self.global_batch, settings.grad_accum)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.last_saved_step = -1
        self.last_path: Path | None = None
        self.resumed_from: Path | None = None
        self.val_ppl: float | None = None
        self.go_on = lambda: resume_hint(self.last_path or self.resumed_from, self.save_path)  # after a failed write
        self.metrics = MetricsLog(self.save_path, settings.tensorboard, self.go_on) if world.is_main else None
        self.checkpoints = CheckpointWriter(background=writes_in_background(self.device))
        if self.save_path.is_dir() and world.is_main:
            remove_stale_temporaries(self.save_path)

    def _choose_attention_kernel(self) -> AttentionChoice | None:
        """Text runs on Hopper train with the faster of cuDNN and flash attention at their shape (one line says
        which); chat runs attend through FlexAttention or a dense mask, which that timing does not describe."""
        if self.train_data.segments is not None:
            return None
        config = self.model.config
        choice = choose_attention_kernel(self.device, self.settings.batch_size, config.n_head,
                                         self.train_data.blocks.shape[1] - 1, config.n_embd // config.n_head,
                                         AUTOCAST_DTYPES.get(self.settings.precision, torch.float32), config.dropout)
        if choice is not None:
            self.log(choice.line())
        return choice

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def _rng(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def state(self, rng_per_rank: list[dict]) -> dict:
        return training_payload(
            model=self.model, optimizer_state=self.optimizer.state_dict(), tokenizer=self.tokenizer,
            progress=asdict(self.progress),
            schedule={"total_steps": self.total_steps,
                      "lr": self.learning_rate(self.progress.step)},
            settings=asdict(self.settings), rng={**rng_per_rank[0], "per_rank": rng_per_rank},
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            data_fingerprint=self.train_data.fingerprint, origin=self.origin)

    def learning_rate(self, step: int) -> float:
        return learning_rate(step, self.settings.lr, self.settings.warmup, self.total_steps)

    def restore(self, state: TrainingState, path: Path | None = None) -> None:
        """Continue a run exactly: optimizer moments, counters, position in the epoch and random state."""
        self.resumed_from = path
        self.optimizer.load_state_dict(state.optimizer)
        if self.scaler.is_enabled() and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.progress = Progress(**state.progress)
        per_rank = state.rng_per_rank
        rng = per_rank[self.world.rank] if len(per_rank) == self.world.size else per_rank[0]  # exact for the same N
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if state.data_fingerprint != self.train_data.fingerprint:
            self.log("note: the training data differ from the checkpoint's; continuing from the start of its epoch")
            self.progress.batch_in_epoch = 0
        self.last_saved_step = self.progress.step

    def save(self, best: bool = False) -> Path:
        """Write ``KoGPT2_checkpoint_<step>.tar`` (once per step), keep the newest ``keep_last``, and link the best.
        Every rank calls it (its random state goes in too); only rank 0 writes."""
        path = self.save_path / checkpoint_name(self.progress.step)
        rng_per_rank = self.world.gather(self._rng())
        if not self.world.is_main:
            self.last_saved_step = self.progress.step
            return path
        self.metrics.flush()  # the log covers every step a checkpoint holds
        then, best_path = self.go_on(), self.save_path / BEST_NAME
        if self.last_saved_step != self.progress.step:
            keep, run, step = self.settings.keep_last, self.origin.run, self.progress.step

            def finish() -> None:  # once the file is whole
                rotate(self.save_path, keep, run, step)
                if best:
                    link_checkpoint(path, best_path, then)

            self.checkpoints.write(path, self.state(rng_per_rank), then, finish)
            self.last_saved_step = step
        elif best:
            self.checkpoints.wait()
            link_checkpoint(path, best_path, then)
        return path

    # ---- evaluation and samples ------------------------------------------------------------------------------
    def _evaluate(self) -> tuple[float | None, bool]:
        if self.val_data is None:
            return None, False
        val_loss = evaluate(self.model, self.val_data, self.settings.batch_size, self.settings.precision) \
            if self.world.is_main else 0.0
        (val_loss,) = self.world.broadcast([val_loss])  # every rank decides "best" and early stops alike
        improved = val_loss < self.progress.best_val_loss
        if improved:
            self.progress.best_val_loss = val_loss
            self.progress.best_step = self.progress.step
            self.progress.evals_without_improvement = 0
        else:
            self.progress.evals_without_improvement += 1
        return val_loss, improved

    def _sample(self) -> str:
        """A short text from the fixed phrase (chat: an answer to the fixed question), drawn with the run's seed on
        its own generator, so the run's randomness is untouched."""
        was_training = self.model.training
        self.model.eval()
        text = fixed_sample(self.model, self.tokenizer, self.settings.sample_phrase, self.settings.chat,
                            self.settings.seed)
        self.model.train(was_training)
        if self.settings.samples_dir:
            self.metrics.write_sample(self.settings.samples_dir, self.progress.step, text)
        return text

    # ---- the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        """Train to the end of ``epochs`` (or an early stop or a signal); returns the last checkpoint written."""
        from tqdm.auto import tqdm

        settings, progress = self.settings, self.progress
        if self.metrics is not None:  # a resume's steps past its checkpoint, or a restart's that never saved
            self.metrics.trim(progress.step)
        self.model.train()
        self.last_path = None
        with StopRequest() as stop:  # a Ctrl-C while the last checkpoint is written waits for it too
            try:
                while progress.epoch < settings.epochs:
                    done = math.ceil(progress.batch_in_epoch / settings.grad_accum)
                    with tqdm(total=self.steps_per_epoch, initial=done, unit="step", dynamic_ncols=True,
                              desc=f"epoch {progress.epoch + 1}/{settings.epochs}",
                              disable=not self.world.is_main) as bar:
                        reason = self._epoch(bar, stop)
                    if reason:
                        self.log(reason)
                        break
            except BaseException:  # the error in flight is the one to report; a failed write too, if there was one
                failed = self.checkpoints.wait(raising=False)
                if failed is not None:
                    self.log(f"error: {failed}", file=sys.stderr)
                raise
            self.checkpoints.wait()
        return self.last_path

    def _epoch(self, bar, stop: StopRequest) -> str | None:
        """The rest of the current epoch; returns why training must stop early, if it must.

        Each step's loss is read one step late: the host queues step k+1 before it waits for step k's loss, so a
        GPU never idles between steps while the host logs. Where the run evaluates, saves or stops (which wait for
        the device anyway), the step is read at once, so its checkpoint holds its own loss."""
        settings, progress = self.settings, self.progress
        order = epoch_order(len(self.train_data.blocks), settings.seed, progress.epoch)
        batches = [order[i:i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        pace = Pace()
        unread: QueuedStep | None = None
        while True:
            group = batches[progress.batch_in_epoch:progress.batch_in_epoch + settings.grad_accum]
            queued = self._step(group, stop.signal is not None)
            if unread is not None:
                self._read(unread, pace, bar)
            unread = queued
            progress.batch_in_epoch += len(group)
            progress.step += 1
            queued.entry = {"step": progress.step, "epoch": progress.epoch + 1,
                            "lr": self.learning_rate(progress.step - 1)}
            end_of_epoch = progress.batch_in_epoch >= len(batches)
            if end_of_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            evaluating = end_of_epoch if settings.eval_every <= 0 else progress.step % settings.eval_every == 0
            improved = False
            if evaluating:
                val_loss, improved = self._evaluate()
                if val_loss is not None:
                    self.val_ppl = math.exp(min(val_loss, 50))
                    queued.entry.update(val_loss=val_loss, val_ppl=self.val_ppl)
                if self.world.is_main:
                    bar.write(f"[step {progress.step}] sample: {self._sample()}")
            early_stop = settings.patience > 0 and progress.evals_without_improvement >= settings.patience
            # under torchrun only the flags summed over the ranks, so that every rank stops at the same step
            stopping = queued.any_rank_stops if self.world.active else stop.signal is not None
            saving = end_of_epoch or improved or early_stop or stopping or progress.step % settings.save_every == 0
            if evaluating or saving:
                self._read(queued, pace, bar)
                unread = None
            if saving:
                self.last_path = self.save(best=improved)
            if early_stop or stopping:  # the message names the last checkpoint: it must be on disk
                self.checkpoints.wait()
            if early_stop:
                return f"early stop: validation loss has not improved for {settings.patience} evaluations"
            if stopping:
                by = signal.Signals(stop.signal).name if stop.signal else "a signal to another rank"
                return f"stopped by {by} at step {progress.step}; resume with --load_path {self.last_path}"
            if end_of_epoch:
                return None

    def _read(self, step: QueuedStep, pace: Pace, bar) -> None:
        """Wait for a queued step's loss (summed over the ranks), then log it."""
        (loss_sum,) = self.world.sum([step.loss_sum.read()])
        loss = loss_sum / max(1, step.tokens)
        tokens_per_s = pace.tokens_per_s(step.tokens)
        self.progress.loss = loss
        if self.metrics is not None:
            self.metrics.write(**step.entry, train_loss=loss, tokens_per_s=round(tokens_per_s, 1))
        bar.set_postfix(loss=f"{loss:.3f}", val_ppl=f"{self.val_ppl:.2f}" if self.val_ppl else "-",
                        tok_s=f"{tokens_per_s:.0f}")
        bar.update(1)

    def _step(self, group: list[torch.Tensor], stop_here: bool) -> QueuedStep:
        """One optimizer step over ``grad_accum`` global batches, this rank doing its share of each, queued on the
        device (nothing here waits for it); its loss is the mean over all their real tokens.
        The first compiled step falls back to eager, with one line, if the compiler fails (only then: an error of
        the device, such as a failed assert, leaves its context broken and is not retried)."""
        try:
            if self.compile_checked:
                return self._optimizer_step(group, stop_here)
            result = self._first_compiled_step(group, stop_here)
            self.compile_checked = True
            return result
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            raise KoGPT2Error(self._out_of_memory()) from None

    def _first_compiled_step(self, group: list[torch.Tensor], stop_here: bool) -> QueuedStep:
        from torch._dynamo.exc import TorchDynamoException  # 1.4 s to import: only when compiling

        try:
            return self._optimizer_step(group, stop_here)
        except TorchDynamoException as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            self.log(f"note: torch.compile failed ({type(error).__name__}: {reason}); training goes on without it")
            self.optimizer.zero_grad(set_to_none=True)
            self.forward_model = self.eager_model
            self.model.plain_autograd = False
            return self._optimizer_step(group, stop_here)

    def _out_of_memory(self) -> str:
        settings = self.settings
        blocks = self.train_data.blocks.shape[1] - 1
        smaller = f"--batch_size {max(1, settings.batch_size // 2)} --grad_accum {settings.grad_accum * 2}"
        last = self.last_path or self.resumed_from
        kept = f"the last checkpoint ({last}) is untouched" if last else "no checkpoint was written"
        return (f"out of GPU memory with --batch_size {settings.batch_size} x --max_len {blocks}; try {smaller} (the "
                f"same batch in two passes), a smaller --max_len, or --grad_checkpoint; {kept}")

    def _optimizer_step(self, group: list[torch.Tensor], stop_here: bool) -> QueuedStep:
        settings, world = self.settings, self.world
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = self.learning_rate(self.progress.step)
        total_tokens = int(sum(self.train_data.real_tokens[idx].sum() for idx in group))
        loss_sum = torch.zeros((), dtype=sum_dtype(self.device), device=self.device)
        rows = self.global_batch if settings.compile else world.size  # fixed shapes compiled; a row for every rank
        for n, idx in enumerate(group):
            syncing = n == len(group) - 1 or self.ddp is None
            with nullcontext() if syncing else self.ddp.no_sync():  # gradients travel once per step
                batch = shard(self.train_data, idx, rows, world.size, world.rank)
                loss = batch_loss_sum(self.forward_model, batch, self.device, settings.precision)
                # DDP averages over ranks: undo that, keep the sum (the scaler multiplies it only under fp16)
                self.scaler.scale(loss * (world.size / total_tokens)).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trained, settings.clip)
        self.scaler.step(self.optimizer)  # skipped under fp16 when the gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        (stops,) = world.sum([float(stop_here)])  # the host's flags alone: no wait for the device
        return QueuedStep(HostCopy(loss_sum), total_tokens, stops > 0)


@dataclass
class QueuedStep:
    """An optimizer step queued on the device: its summed loss on the way to the host, its real tokens (counted on
    the host), whether any rank was asked to stop, and its metrics line (filled in by the loop)."""

    loss_sum: HostCopy
    tokens: int
    any_rank_stops: bool
    entry: dict | None = None


class Pace:
    """Tokens per second since the epoch (or the resumed part of it) began, as the steps are read."""

    def __init__(self) -> None:
        self.tokens, self.started = 0, time.perf_counter()

    def tokens_per_s(self, tokens: int) -> float:
        self.tokens += tokens
        return self.tokens / max(1e-9, time.perf_counter() - self.started)


def writes_in_background(device: torch.device) -> bool:
    """On a GPU, a checkpoint is copied to the host and written while training goes on (the copy is needed to
    write it anyway); on the CPU, that copy would double the memory of model and optimizer for a few seconds saved
    every ``--save_every`` steps, so it is written in place."""
    return device.type == "cuda"


def shard(data: PackedData, idx: torch.Tensor, rows: int, ranks: int, rank: int) -> Batch:
    """This rank's part of the global batch ``idx``, padded to at least ``rows`` rows with copies of its first
    block whose targets are all ignored: the loss and gradients are those of ``idx`` alone."""
    padding = max(0, rows - len(idx))
    padded = torch.cat([idx, idx[:1].expand(padding)]).tensor_split(ranks)[rank]
    ignored = (torch.arange(len(idx) + padding) >= len(idx)).tensor_split(ranks)[rank]
    batch = data.batch(padded)
    batch.targets[ignored] = IGNORE_INDEX
    return batch
