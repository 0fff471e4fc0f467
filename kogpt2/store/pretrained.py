"""Where a KoGPT2 release's files are (hub id, Hugging Face directory or the 2020 v1 files), and reading its weights."""
from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..defaults import PRETRAINED as DEFAULT_PRETRAINED
from ..errors import KoGPT2Error
from ..model.gpt import GPTConfig
from .checkpoint import load_tensors_only, verify_archive

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
V1_CHECKSUMMED = re.compile(r"_([0-9a-f]{10})\.[A-Za-z]+$")  # pytorch_kogpt2_676e9bcfa7.params


class ReleaseUnavailable(KoGPT2Error):
    """The hub release can be neither downloaded nor found in the cache."""


@dataclass
class PretrainedFiles:
    """Where a release's three parts are, and what it is called in messages."""

    name: str
    config: GPTConfig | None  # None: inferred from the weights (v1 ships no config)
    weights: Path | None  # None: not fetched (only the tokenizer was asked for)
    tokenizer: Path


def locate(source: str, with_weights: bool = True) -> PretrainedFiles:
    """The release's files; from the hub, ``with_weights=False`` leaves the 500 MB of weights undownloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _local_directory(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return _hub(source, with_weights)
    raise KoGPT2Error(
        f"--pretrained {source}: no such directory, and not a Hugging Face hub id (owner/name). "
        f"Give {DEFAULT_PRETRAINED}, a directory with config.json + weights + tokenizer.json, or a directory with "
        "the v1 *.params and *.spiece files")


def _local_directory(path: Path) -> PretrainedFiles:
    if (path / "config.json").is_file():
        weights = next((path / w for w in HF_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise KoGPT2Error(f"{path} has config.json but no {' or '.join(HF_WEIGHTS)}")
        if not (path / "tokenizer.json").is_file():
            raise KoGPT2Error(f"{path} has config.json but no tokenizer.json")
        return PretrainedFiles(str(path), _read_hf_config(path / "config.json"), weights, path / "tokenizer.json")
    params = sorted(path.glob("*.params"))
    spiece = sorted(path.glob("*.spiece"))
    if len(params) == 1 and len(spiece) == 1:
        for file in (params[0], spiece[0]):
            _check_release_checksum(file)
        return PretrainedFiles(str(path), None, params[0], spiece[0])
    raise KoGPT2Error(
        f"{path} is not a KoGPT2 release: expected config.json + {' or '.join(HF_WEIGHTS)} + tokenizer.json (v2), "
        f"or exactly one *.params and one *.spiece file (v1); found {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'}")


def _read_hf_config(path: Path) -> GPTConfig:
    try:
        return GPTConfig.from_hf(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as error:
        raise KoGPT2Error(f"{path} is not a GPT-2 config.json ({error!r})") from None


def _check_release_checksum(path: Path) -> None:
    """The v1 release names end in the first 10 hex digits of the file's md5, which the original code checked."""
    match = V1_CHECKSUMMED.search(path.name)
    if not match:
        return
    md5 = hashlib.md5()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            md5.update(chunk)
    if not md5.hexdigest().startswith(match.group(1)):
        raise KoGPT2Error(f"{path} is corrupt: its md5 is {md5.hexdigest()[:10]}..., the release's is {match.group(1)}...; "
                          "download it again")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a torch pickle read with ``weights_only`` so no code in it can run."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:
            raise KoGPT2Error(f"{path} is not a usable safetensors file ({error})") from None
    else:
        verify_archive(path)
        state = load_tensors_only(path, "weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KoGPT2Error(f"{path} is not a state dict of tensors")
    return state


# ---- the Hugging Face hub ----------------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before downloading: huggingface_hub retries a dead network for about 20 s per file."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub(repo_id: str, with_weights: bool) -> PretrainedFiles:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = not _hub_reachable()

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))

    try:
        config = fetch("config.json")
        tokenizer = fetch("tokenizer.json")
        weights = None
        for name in HF_WEIGHTS if with_weights else ():  # whichever the repository has (EntryNotFound: "not cached" too)
            try:
                weights = fetch(name)
                break
            except EntryNotFoundError:
                continue
        if weights is None and with_weights:
            raise LocalEntryNotFoundError(f"no {' or '.join(HF_WEIGHTS)}")
    except RepositoryNotFoundError:
        raise KoGPT2Error(f"{repo_id} is not a model repository on the Hugging Face hub") from None
    except LocalEntryNotFoundError as error:
        raise ReleaseUnavailable(
            f"cannot get {repo_id}: {'no network and ' if offline else ''}not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) [{type(error).__name__}]. Connect to the internet once, or download config.json, "
            f"pytorch_model.bin and tokenizer.json from https://huggingface.co/{repo_id} into a folder and pass "
            "--pretrained FOLDER") from None
    except Exception as error:  # a broken download surfaces as many types (httpx, OSError, hub errors)
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise KoGPT2Error(
            f"downloading {repo_id} failed ({type(error).__name__}: {reason}); nothing incomplete was kept as a "
            "model: run the same command again to resume the download") from None
    return PretrainedFiles(repo_id, _read_hf_config(config), weights, tokenizer)
