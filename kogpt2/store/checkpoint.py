"""The ``.tar`` checkpoint format, owned here alone: writing it atomically, rotating old ones, reading it back with
``weights_only=True`` (no code can run from it), and a typed record of what readers need.

Keys (docs/ARCHITECTURE.md lists them with their types): ``model_state_dict``, ``optimizer_state_dict``, ``epoch``,
``train_no`` and ``loss`` as in 2020 checkpoints; ``format_version``, ``config``, ``tokenizer``, ``progress``,
``schedule``, ``settings``, ``rng``, ``scaler``, ``data_fingerprint``, ``data``, ``pretrained``, ``mode``,
``chat_turns``, ``args`` and ``run`` are ours. A LoRA run's checkpoints hold ``adapters``, ``lora`` and ``base`` (how to
find its frozen base again) instead of ``model_state_dict``."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..corpus.reading import CsvFile
from ..corpus.tokenizer import Tokenizer, tokenizer_from_bytes
from ..defaults import DATA_FORMAT, TXT_UNIT
from ..errors import KeptWriteErrors, KoGPT2Error, write_error, writing
from ..model.gpt import GPT
from ..model.hf_layout import hf_state_dict
from ..model.lora import LoraSettings, adapter_state

FORMAT_VERSION = 1
NAME = re.compile(r"^KoGPT2_checkpoint_(\d+)\.tar$")
BEST_NAME = "KoGPT2_best.tar"
UNNAMED_RUN = "unnamed"  # the run of our checkpoints written before runs had an identity: all count as one


def checkpoint_name(step: int) -> str:
    return f"KoGPT2_checkpoint_{step}.tar"


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    return {"kind": tokenizer.kind, "data": torch.frombuffer(bytearray(tokenizer.data), dtype=torch.uint8)}


def save_checkpoint(path: Path, payload: dict, then: str = "run it again") -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash or a full disk at
    any moment leaves either the old file or the new one, never a torn one. A failed write is one line that ends
    with ``then``: how to go on once the disk has room."""
    path = Path(path)
    tmp = writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as file:
            writer = KeptWriteErrors(file)
            torch.save(payload, writer)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failed = writer.error if writer and writer.error else error if isinstance(error, OSError) else None
        if failed is not None:
            raise write_error(path, failed, then, "checkpoint") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointWriter:
    """Writes a run's checkpoints one at a time, in the background where asked: the state is copied to the host
    (the step's only wait), and training goes on while a thread writes it (atomically, as ``save_checkpoint``
    always does: a kill during the write leaves the previous checkpoint). A failed write is raised at the next
    write or ``wait``, with its own one line; ``wait`` before the process ends."""

    def __init__(self, background: bool) -> None:
        self.background = background
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def write(self, path: Path, payload: dict, then: str, finish: Callable[[], None]) -> None:
        """Write ``payload`` to ``path``; then ``finish`` (rotation, links), which needs the file whole."""
        self.wait()
        if not self.background:
            save_checkpoint(path, payload, then)
            finish()
            return
        snapshot = host_snapshot(payload)

        def write_then_finish() -> None:
            try:
                save_checkpoint(path, snapshot, then)
                finish()
            except BaseException as error:  # noqa: BLE001 - raised again by wait(), in the training thread
                self.error = error

        self.thread = threading.Thread(target=write_then_finish, name=f"writing {path.name}")
        self.thread.start()

    def wait(self, raising: bool = True) -> BaseException | None:
        """Until the last write has ended; its failure, if it failed (raised, or returned where another error is
        already being reported)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None and raising:
            raise error
        return error


def host_snapshot(value):
    """``value`` (a checkpoint's payload) with every tensor copied to the host, so training can go on changing its
    own; tensors that shared storage (a tied weight) still share it, as ``torch.save`` keeps them."""
    copies: dict[tuple, torch.UntypedStorage] = {}

    def copy(item):
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key not in copies:
                copies[key] = storage.clone() if storage.device.type == "cpu" else storage.cpu()
            return torch.empty(0, dtype=item.dtype).set_(copies[key], item.storage_offset(), item.size(), item.stride())
        if isinstance(item, dict):
            return {k: copy(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(copy(v) for v in item)
        return item

    return copy(value)


def resume_hint(last: Path | None, save_path: Path) -> str:
    """How to go on after a run stopped at a failed write (a full disk): from its last checkpoint on disk."""
    return f"resume with --load_path {last}" if last else \
        f"start over with --load_path {save_path} (no checkpoint was written yet)"


def link_checkpoint(source: Path, target: Path, then: str = "run it again") -> None:
    """Make ``target`` a second name of ``source`` (atomically; checkpoints are only ever replaced, never edited)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    with writing(target, then, "checkpoint"):
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links: copy instead, leaving no partial copy
            try:
                shutil.copyfile(source, tmp)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, target)


PICKLE_START = b"\x80"  # the pre-1.6 torch format is a bare pickle: protocol 2+ starts with 0x80


def verify_archive(path: Path, what: str = "checkpoint") -> None:
    """``torch.load`` does not check the zip's CRC-32s, so a flipped bit would load as wrong weights: check them.
    (The pre-1.6 torch format, which 2020 checkpoints may use, has no checksums; torch.load judges it alone.)"""
    path = Path(path)
    if path.is_dir():
        raise KoGPT2Error(f"{path} is a folder, not a {what} file")
    try:
        with path.open("rb") as file:
            start = file.read(4)
    except FileNotFoundError:
        raise KoGPT2Error(f"{path}: no such {what}") from None
    except OSError as error:
        raise KoGPT2Error(f"{path}: cannot read ({error.strerror})") from None
    if not zipfile.is_zipfile(path):
        if start.startswith(b"PK"):
            raise KoGPT2Error(f"{path} is truncated or corrupt (its archive is incomplete, e.g. a copy or download "
                              f"cut short); use an earlier {what} or copy it again")
        if not start.startswith(PICKLE_START):
            raise KoGPT2Error(f"{path} is not a {what} file (not a PyTorch archive); give a .tar written by main.py")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        raise KoGPT2Error(f"{path} is truncated or corrupt (its archive cannot be read); use an earlier {what} "
                          "or copy it again") from None
    if bad is not None:
        raise KoGPT2Error(f"{path} is corrupt ({bad} fails its checksum); use an earlier checkpoint")


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of saves that a crash cut short; they never replaced a checkpoint."""
    for tmp in Path(folder).glob(".KoGPT2_*.tmp"):
        tmp.unlink(missing_ok=True)


def load_tensors_only(path: Path, what: str):
    """``torch.load`` with ``weights_only``: a pickle that would call anything (run code) is refused unrun."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KoGPT2Error(f"{path}: no such {what}") from None
    except pickle.UnpicklingError as error:
        called = re.search(r"GLOBAL ([\w.]+)", str(error))
        if called:
            raise KoGPT2Error(f"{path} is refused: loading it would call {called.group(1)} (a pickle that can run code, "
                              f"or a damaged file); only plain tensors and data are loaded") from None
        raise KoGPT2Error(f"{path} is not a usable {what} (truncated or corrupt)") from None
    except Exception:
        raise KoGPT2Error(f"{path} is not a usable {what} (truncated or corrupt); use an earlier one or copy it "
                          "again") from None


def load_checkpoint(path: str | Path) -> dict:
    """Tensors, numbers, strings, lists and dicts only; anything else (a code-running pickle) is refused."""
    path = Path(path)
    verify_archive(path)
    payload = load_tensors_only(path, "checkpoint")
    if not isinstance(payload, dict) or not {"model_state_dict", "adapters"} & set(payload):
        raise KoGPT2Error(f"{path} is not a KoGPT2 checkpoint (no model_state_dict)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise KoGPT2Error(f"{path} was written by a newer kogpt2-finetune (format {payload['format_version']}); update")
    return payload


def is_ours(payload: dict) -> bool:
    """Our checkpoints carry config and tokenizer; the 2020 original's carry only weights and optimizer state."""
    return "format_version" in payload


def tokenizer_of(payload: dict) -> Tokenizer | None:
    """The tokenizer stored in one of our checkpoints; None for a 2020 checkpoint, which has none."""
    if not is_ours(payload):
        return None
    record = payload["tokenizer"]
    return tokenizer_from_bytes(record["kind"], record["data"].numpy().tobytes())


@dataclass(frozen=True)
class TrainingState:
    """What continues a run exactly, as a resume reads it."""

    optimizer: dict
    scaler: dict | None  # fp16 runs only
    progress: dict  # the fields of the trainer's Progress
    rng_per_rank: list[dict]  # torch (and CUDA) random state of each torchrun rank
    data_fingerprint: str | None


@dataclass(frozen=True)
class BaseModel:
    """Where a LoRA run's frozen base is (a hub id, or the absolute path of a folder or a model file) and the
    checksum of its weights as loaded: the adapters fit those weights and no others."""

    source: str
    kind: str  # "hub", "folder" or "file"
    sha256: str

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256}


@dataclass(frozen=True)
class CheckpointRecord:
    """What readers need to know about a checkpoint, so none of them reads its keys by name."""

    path: Path
    ours: bool  # written by kogpt2-finetune; False: a 2020 checkpoint (weights and optimizer only)
    training: TrainingState | None  # None: nothing to resume (a file written by kogpt2.export, a 2020 checkpoint)
    config: dict | None  # GPTConfig fields; None: a 2020 checkpoint (its weights tell the shape)
    step: int
    epoch: int
    mode: str  # "text" or "chat"
    data_path: str | None
    data_sha256: str | None
    column: str | None
    pretrained: str | None
    run: str | None  # the training run it belongs to (kept by a resume); None: a 2020 checkpoint
    args: dict = field(default_factory=dict)
    chat_turns: int = 1  # the most question/answer turns in one training example (more than 1: dialogues)
    lora: LoraSettings | None = None  # a LoRA run's: the file holds adapters, and ``base`` says where their base is
    base: BaseModel | None = None

    @property
    def resumable(self) -> bool:
        return self.training is not None

    @property
    def chat(self) -> bool:
        """A chatbot's checkpoint (``--chat``): generator.py opens a chat, exports end answers at ``<usr>``."""
        return self.mode == "chat"


def read_record(payload: dict, path: str | Path) -> CheckpointRecord:
    data = payload.get("data", {})
    progress = payload.get("progress", {})
    resumable = is_ours(payload) and "optimizer_state_dict" in payload and "rng" in payload
    training = TrainingState(
        optimizer=payload["optimizer_state_dict"], scaler=payload.get("scaler"), progress=payload["progress"],
        rng_per_rank=payload["rng"].get("per_rank", [payload["rng"]]),
        data_fingerprint=payload.get("data_fingerprint")) if resumable else None
    return CheckpointRecord(
        path=Path(path), ours=is_ours(payload), training=training, config=payload.get("config"),
        step=int(progress.get("step", payload.get("train_no", 0))), epoch=int(progress.get("epoch", payload.get("epoch", 0))),
        mode=payload.get("mode", "text"), data_path=data.get("path"), data_sha256=data.get("sha256"),
        column=data.get("column"), pretrained=payload.get("pretrained"), run=run_of(payload),
        args=dict(payload.get("args", {})), chat_turns=int(payload.get("chat_turns", 1)),
        lora=LoraSettings.from_dict(payload["lora"]) if "lora" in payload else None,
        base=BaseModel(**payload["base"]) if "base" in payload else None)


def weights_of(payload: dict) -> dict[str, torch.Tensor]:
    """The model's weights, in the ``GPT2LMHeadModel`` layout (a LoRA checkpoint has none: see ``adapters_of``)."""
    return payload["model_state_dict"]


def adapters_of(payload: dict) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters, as ``model/lora.py``'s ``adapter_state`` names them."""
    return payload["adapters"]


def model_keys(model: GPT, origin: RunOrigin) -> dict:
    """The model as a checkpoint holds it: a LoRA run's adapters, their settings and its base (no base weight: the
    base is found again), else every weight."""
    if origin.lora is None:
        return {"model_state_dict": hf_state_dict(model)}
    return {"adapters": adapter_state(model), "lora": origin.lora.to_dict(), "base": origin.base.to_dict()}


def with_weights(payload: dict, state: dict[str, torch.Tensor]) -> dict:
    """A checkpoint's payload holding ``state`` as its whole model (an adapter checkpoint merged into its base), with
    no adapters and nothing to resume."""
    dropped = {"adapters", "lora", "base", "optimizer_state_dict", "rng", "scaler"}
    return {**{k: v for k, v in payload.items() if k not in dropped}, "model_state_dict": state}


def new_run() -> str:
    """The identity of a new training run: its checkpoints carry it, so a folder tells its own run from another."""
    return uuid.uuid4().hex


def run_of(payload: dict) -> str | None:
    """The run a checkpoint belongs to; None for a 2020 checkpoint, which no run of ours continues."""
    return payload.get("run", UNNAMED_RUN) if is_ours(payload) else None


def run_of_file(path: Path) -> str | None:
    """``run_of`` without reading the tensors (memory-mapped: about 0.1 s for a full-size checkpoint); None for a
    file that cannot be read that way, which thus belongs to no run."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return run_of(payload) if isinstance(payload, dict) else None


@dataclass(frozen=True)
class RunOrigin:
    """Where a run's model and data came from, and which run it is: stored in each of its checkpoints."""

    data_path: str
    data_sha256: str
    column: str
    pretrained: str
    args: dict  # the main.py arguments, defaults resolved
    mode: str  # "text" or "chat"
    run: str
    chat_turns: int = 1
    lora: LoraSettings | None = None  # a LoRA run's adapters, beside its frozen base
    base: BaseModel | None = None

    def keys(self) -> dict:
        return {"data": {"path": str(self.data_path), "sha256": self.data_sha256, "column": self.column},
                "pretrained": self.pretrained, "mode": self.mode, "chat_turns": self.chat_turns,
                "args": {k: v for k, v in self.args.items() if v is not None}, "run": self.run}


def training_payload(*, model: GPT, optimizer_state: dict, tokenizer: Tokenizer, progress: dict,
                     schedule: dict, settings: dict, rng: dict, scaler: dict | None, data_fingerprint: str,
                     origin: RunOrigin) -> dict:
    """A resumable checkpoint: everything that continues the run exactly, and the model (or a LoRA run's adapters)
    with its tokenizer."""
    return {
        "format_version": FORMAT_VERSION,
        "epoch": progress["epoch"], "train_no": progress["step"], "loss": progress["loss"],  # the 2020 names
        **model_keys(model, origin),
        "optimizer_state_dict": optimizer_state,
        "config": model.config.to_dict(),
        "tokenizer": tokenizer_record(tokenizer),
        "progress": progress,
        "schedule": schedule,
        "settings": settings,
        "rng": rng,
        **({"scaler": scaler} if scaler else {}),
        "data_fingerprint": data_fingerprint,
        **origin.keys(),
    }


def rotate(folder: Path, keep_last: int, run: str, step: int) -> None:
    """Keep the newest ``keep_last`` (0: all) of ``run``'s regular checkpoints up to ``step``, the one just written.
    Another run's files are never touched, nor this run's past ``step`` (an earlier branch of it, resumed from an
    older checkpoint), so the file just written always stays; ``KoGPT2_best.tar`` is a separate name."""
    if keep_last > 0:
        mine = [path for number, path in regular_checkpoints(Path(folder))
                if number <= step and run_of_file(path) == run]
        for old in mine[:-keep_last]:
            old.unlink(missing_ok=True)


def find_checkpoint(path: str | Path, prefer_best: bool) -> Path | None:
    """``path`` itself, or for a folder the checkpoint in it to use: ``KoGPT2_best.tar`` first when generating
    (``prefer_best``), else the newest regular one (what a resume wants); None if the folder has none."""
    path = Path(path)
    if not path.is_dir():
        return path
    if prefer_best and (path / BEST_NAME).is_file():
        return path / BEST_NAME
    found = regular_checkpoints(path)
    if found:
        return found[-1][1]
    return path / BEST_NAME if (path / BEST_NAME).is_file() else None


def generation_payload(payload: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What generating needs and nothing else: weights in half precision, config, tokenizer (~250 MB at full size)."""
    if not is_ours(payload):
        raise KoGPT2Error("only checkpoints written by kogpt2-finetune carry their tokenizer; resave first")
    keep = ("format_version", "config", "tokenizer", "progress", "data", "pretrained", "mode", "chat_turns", "args",
            "epoch", "train_no", "loss")
    slim = {k: payload[k] for k in keep if k in payload}
    slim["model_state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                for k, v in payload["model_state_dict"].items() if k != "lm_head.weight"}
    return slim


def regular_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``KoGPT2_checkpoint_<step>.tar`` files in ``folder``, oldest step first."""
    found = [(int(m.group(1)), p) for p in folder.glob("KoGPT2_checkpoint_*.tar") if (m := NAME.match(p.name))]
    return sorted(found)


def open_like_run(path: str | Path, encoding: str | None, data_format: str | None, txt_unit: str | None,
                  record: CheckpointRecord | None) -> CsvFile:
    """``path`` read as ``data_format``/``txt_unit`` say, else as the run of ``record`` read it when it is that run's
    training or validation file (its --format and --txt_unit need not be given again), else by its suffix."""
    run = record.args if record is not None and str(path) in (record.data_path, record.args.get("val_file")) else {}
    return CsvFile(path, encoding, data_format or run.get("format", DATA_FORMAT),
                   txt_unit or run.get("txt_unit", TXT_UNIT))
