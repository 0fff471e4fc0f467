"""The benchmark scripts run every code path (their --smoke modes), so a change cannot silently break them; with
real processes, they are among the slow runs (`pytest -m slow`)."""
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_serve_benchmark_smoke():
    pytest.importorskip("fastapi", reason="the server's packages are absent: pip install -r requirements-serve.txt")
    result = subprocess.run([sys.executable, "bench/serve.py", "--smoke", "--tokens", "8"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "served:" in result.stdout and "64 clients, line of 16:" in result.stdout


@pytest.mark.slow
def test_head_memory_benchmark_smoke():
    result = subprocess.run([sys.executable, "bench/head_memory.py", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "chunked / plain:" in result.stdout


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_contender():
    """Training (eager, compiled) for transformers and ours, decoding on the fixed-shape path, main.py end to end,
    and a checkpoint's stall in place and in the background."""
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for name in ("train_hf_8x512_compile", "train_ours_8x512_compile", "decode_ours_1", "decode_ours_8", "main_e2e"):
        line = next(l for l in result.stdout.splitlines() if l.startswith(name))
        assert "tokens/s" in line, line
    assert "stalls training" in next(l for l in result.stdout.splitlines() if l.startswith("checkpoint_stall"))
