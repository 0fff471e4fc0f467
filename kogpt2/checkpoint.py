"""Self-contained, atomic ``.tar`` checkpoints that load with ``weights_only=True`` (no code can run from them)."""
from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import KoGPT2Error
from .model import GPT, GPTConfig, infer_config, load_hf_state_dict
from .tokenizer import Tokenizer, tokenizer_from_bytes

FORMAT_VERSION = 1
NAME = re.compile(r"^KoGPT2_checkpoint_(\d+)\.tar$")
BEST_NAME = "KoGPT2_best.tar"


def checkpoint_name(step: int) -> str:
    return f"KoGPT2_checkpoint_{step}.tar"


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    return {"kind": tokenizer.kind, "data": torch.frombuffer(bytearray(tokenizer.data), dtype=torch.uint8)}


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash or a full disk at
    any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            why = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
            raise KoGPT2Error(f"could not write checkpoint {path}: {why}; the previous checkpoints are intact") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a second name of ``source`` (atomically; checkpoints are only ever replaced, never edited)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def verify_archive(path: Path) -> None:
    """``torch.load`` does not check the zip's CRC-32s, so a flipped bit would load as wrong weights: check them.
    (The pre-1.6 torch format, which 2020 checkpoints may use, has no checksums; torch.load judges it alone.)"""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as error:
        raise KoGPT2Error(f"{path} is not a usable checkpoint (truncated or corrupt: {error})") from None
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
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise KoGPT2Error(f"{path} is not a usable {what} (truncated or corrupt: {reason})") from None


def load_checkpoint(path: str | Path) -> dict:
    """Tensors, numbers, strings, lists and dicts only; anything else (a code-running pickle) is refused."""
    path = Path(path)
    verify_archive(path)
    payload = load_tensors_only(path, "checkpoint")
    if not isinstance(payload, dict) or "model_state_dict" not in payload:
        raise KoGPT2Error(f"{path} is not a KoGPT2 checkpoint (no model_state_dict)")
    return payload


def is_ours(payload: dict) -> bool:
    """Our checkpoints carry config and tokenizer; the 2020 original's carry only weights and optimizer state."""
    return "format_version" in payload


def model_from_checkpoint(payload: dict, path: str | Path, tokenizer: Tokenizer | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer a checkpoint holds. A 2020 checkpoint has no tokenizer: ``tokenizer`` (v1) is used."""
    state = payload["model_state_dict"]
    if is_ours(payload):
        if payload["format_version"] > FORMAT_VERSION:
            raise KoGPT2Error(f"{path} was written by a newer kogpt2-finetune (format {payload['format_version']}); update")
        config = GPTConfig.from_dict(payload["config"])
        record = payload["tokenizer"]
        tokenizer = tokenizer_from_bytes(record["kind"], record["data"].numpy().tobytes())
    else:
        if tokenizer is None:
            raise KoGPT2Error(f"{path} is a 2020-format checkpoint with no tokenizer inside; "
                              "give the v1 files with --pretrained DIR (*.params + *.spiece)")
        try:
            config = infer_config(state, activation="gelu")
        except KeyError as error:
            raise KoGPT2Error(f"{path}: model_state_dict lacks {error}") from None
    if config.vocab_size != tokenizer.vocab_size:
        raise KoGPT2Error(f"{path}: the checkpoint's vocabulary has {config.vocab_size} tokens but the tokenizer has "
                          f"{tokenizer.vocab_size} (v1 weights need the v1 tokenizer, v2 weights the v2 one)")
    model = GPT(config)
    try:
        load_hf_state_dict(model, state)
    except KoGPT2Error as error:
        raise KoGPT2Error(f"{path}: {error}") from None
    return model, tokenizer


def generation_payload(payload: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What generating needs and nothing else: weights in half precision, config, tokenizer (~250 MB at full size)."""
    if not is_ours(payload):
        raise KoGPT2Error("only checkpoints written by kogpt2-finetune carry their tokenizer; resave first")
    keep = ("format_version", "config", "tokenizer", "progress", "data", "pretrained", "epoch", "train_no", "loss")
    slim = {k: payload[k] for k in keep if k in payload}
    slim["model_state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                for k, v in payload["model_state_dict"].items() if k != "lm_head.weight"}
    return slim


def regular_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``KoGPT2_checkpoint_<step>.tar`` files in ``folder``, oldest step first."""
    found = [(int(m.group(1)), p) for p in folder.glob("KoGPT2_checkpoint_*.tar") if (m := NAME.match(p.name))]
    return sorted(found)
