"""Where and how to run: device, precision, the CPU allocator setting (shared by training, generation, evaluation),
device values read without stalling the device, and the attention kernel a Hopper GPU trains with."""
from __future__ import annotations

import ctypes
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import KoGPT2Error


def pick_device(name: str) -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise KoGPT2Error(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
            raise KoGPT2Error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
        if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise KoGPT2Error("--device mps: Apple's GPU is not available here; use --device cpu")
        if name.startswith("cuda:"):  # the current GPU too: streams, events and graphs made later go to it
            torch.cuda.set_device(int(name[5:]))
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it (Ampere and later), fp16 with a gradient scaler on older CUDA GPUs (T4, V100,
    P100), fp32 on the CPU (bf16 is a choice there: see the tip main.py prints)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def use_compile(name: str, device: torch.device) -> bool:
    """auto: on for CUDA, where it measured 2x faster; off on the CPU, where it was not faster (bench/README.md)."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def cpu_bf16_instructions() -> list[str]:
    """The CPU's bf16 matrix instructions (Intel AMX tiles, AVX-512 BF16 on Intel and AMD Zen 4), from /proc/cpuinfo;
    [] where there are none or the system does not say. With them, bf16 autocast trains markedly faster."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for name in ("amx_bf16", "avx512_bf16") if name in flags]


def make_deterministic() -> None:
    """Bit-exact runs on a GPU, at some speed: deterministic kernels (no atomic adds in the embedding's backward or
    in flash attention's), and cuBLAS with a fixed workspace (set before CUDA starts). On the CPU runs are exact
    already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def keep_freed_memory() -> None:
    """glibc hands big freed buffers back to the OS and faults them in again every step; keeping them makes
    CPU training steps markedly faster (see bench/README.md). A no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 16 << 30)


def sum_dtype(device: torch.device) -> torch.dtype:
    """Loss sums stay on the device in float64 (exactly as Python floats added them), float32 where there is none."""
    return torch.float32 if device.type == "mps" else torch.float64


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued now (into pinned memory, with an
    event, on CUDA) and waited for only when read, so the host can queue the next step before it waits."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.ready = None
        if tensor.device.type == "cuda":
            self.values = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.values.copy_(tensor, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(tensor.device))  # the copy's GPU, not the current one
        else:
            self.values = tensor.to("cpu")

    def read(self):
        """The values (a number, or lists of them), once the copy has landed."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


@dataclass(frozen=True)
class AttentionChoice:
    """Seconds per forward + backward of causal attention at a run's shape for each kernel that ran, and the one
    put first in torch's order for the run."""

    seconds: dict[str, float]  # "flash", "cudnn"
    pick: str

    def line(self) -> str:
        timings = ", ".join(f"{name} {seconds * 1e3:.3f} ms" for name, seconds in self.seconds.items())
        return f"attention: {timings} per forward+backward at this run's shape; {self.pick} goes first"


ATTENTION_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
CUDNN_MARGIN = 0.97  # cuDNN must beat flash by 3%: a closer timing is within the noise, and a tie keeps flash


def faster_attention(time_kernel: Callable[[SDPBackend], float]) -> AttentionChoice | None:
    """Flash and cuDNN timed by ``time_kernel`` (a kernel that raises, say for this shape, dtype or deterministic
    mode, is left out); cuDNN wins only by more than the margin. None when neither ran."""
    seconds = {}
    for name, kernel in ATTENTION_KERNELS.items():
        try:
            seconds[name] = time_kernel(kernel)
        except RuntimeError:
            continue
    if not seconds:
        return None
    cudnn_faster = seconds.get("cudnn", math.inf) < CUDNN_MARGIN * seconds.get("flash", math.inf)
    return AttentionChoice(seconds, "cudnn" if cudnn_faster else "flash")


def choose_attention_kernel(device: torch.device, batch: int, heads: int, block: int, head_dim: int,
                            dtype: torch.dtype, dropout: float,
                            time_kernel: Callable[[SDPBackend], float] | None = None) -> AttentionChoice | None:
    """On Hopper and later (compute capability 9+), put the faster of cuDNN and flash attention first for the run,
    measured at its shape: which wins depends on the shape, the dtype and the cuDNN release, and torch puts cuDNN
    first on some of them unmeasured. Nothing changes elsewhere. ``time_kernel`` replaces the GPU's timing."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return None
    time_kernel = time_kernel or functools.partial(time_attention, device=device, batch=batch, heads=heads,
                                                   block=block, head_dim=head_dim, dtype=dtype, dropout=dropout)
    choice = faster_attention(time_kernel)
    if choice is not None:
        put_first(ATTENTION_KERNELS[choice.pick])
    return choice


def put_first(kernel: SDPBackend) -> None:
    """``kernel`` first in torch's attention order for the rest of the process, the others as they were. Called
    after a CUDA attention has run: torch sets its default order at the first one, over an order set before."""
    order = [int(kernel)] + [k for k in torch._C._get_sdp_priority_order() if k != int(kernel)]
    torch._C._set_sdp_priority_order(order)


def time_attention(kernel: SDPBackend, device: torch.device, batch: int, heads: int, block: int, head_dim: int,
                   dtype: torch.dtype, dropout: float, repeats: int = 10) -> float:
    """Seconds per causal attention forward + backward with one kernel, the best of three rounds after a warm-up
    (the first call plans cuDNN's graph). The random state is left as it was, and a kernel that cannot run raises
    without torch's warnings about why."""
    with torch.random.fork_rng(devices=[device]), sdpa_kernel(kernel), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, k, v = (torch.randn(batch, heads, block, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # [B, head, T, hs]
        grad = torch.randn_like(q)

        def step() -> None:
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True).backward(grad)

        step()
        rounds = []
        for _ in range(3):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                step()
            torch.cuda.synchronize(device)
            rounds.append((time.perf_counter() - started) / repeats)
    return min(rounds)
