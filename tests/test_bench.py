"""The benchmark scripts run every code path (their --smoke modes), so a change cannot silently break them."""
import subprocess
import sys

import pytest

from conftest import REPO


def test_serve_benchmark_smoke():
    pytest.importorskip("fastapi", reason="the server's packages are absent: pip install -r requirements-serve.txt")
    result = subprocess.run([sys.executable, "bench/serve.py", "--smoke", "--tokens", "8"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "served / engine:" in result.stdout
