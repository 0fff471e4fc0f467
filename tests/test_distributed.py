"""main.py under torchrun (Gloo on CPU): the same run as one process with the whole batch."""
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SAMPLE_CSV, run_main

from kogpt2.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
TINY = ("--data_file_path", SAMPLE_CSV, "--pretrained", "scratch:tiny", "--max_len", "64", "--dropout", "0",
        "--seed", "1", "--grad_accum", "2", "--keep_last", "0")


def torchrun(*argv, extra=(), **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *extra, "main.py", *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    process = torchrun(*TINY, "--epoch", 2, "--batch_size", 2, "--save_path", folder)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return folder, out


def test_two_processes_equal_one_process_with_twice_the_batch(two_process_run, tmp_path):
    folder, out = two_process_run
    assert "batch 2 x 2 processes = 4" in out
    assert run_main(*TINY, "--epoch", 2, "--batch_size", 4, "--save_path", tmp_path) == 0
    one, two = metrics(tmp_path), metrics(folder)
    assert len(two) == len(one) >= 20
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and abs(a["train_loss"] - b["train_loss"]) <= 1e-5
    last = f"KoGPT2_checkpoint_{one[-1]['step']}.tar"
    want, got = load_checkpoint(tmp_path / last), load_checkpoint(folder / last)
    for name, tensor in want["model_state_dict"].items():
        assert (tensor - got["model_state_dict"][name]).abs().max() <= 1e-5, name


def test_one_set_of_files_that_resumes_with_one_or_two_processes(two_process_run, tmp_path):
    folder, _ = two_process_run
    steps = [m["step"] for m in metrics(folder)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: each step logged once
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["KoGPT2_best.tar", "metrics.jsonl", "loss.png",
                            f"KoGPT2_checkpoint_{steps[-1] // 2}.tar", f"KoGPT2_checkpoint_{steps[-1]}.tar"])
    middle = folder / f"KoGPT2_checkpoint_{steps[-1] // 2}.tar"
    assert run_main(*TINY, "--epoch", 2, "--batch_size", 4, "--load_path", middle, "--save_path", tmp_path / "one") == 0
    process = torchrun(*TINY, "--epoch", 2, "--batch_size", 2, "--load_path", middle, "--save_path", tmp_path / "two")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "resuming from" in out
    final = f"KoGPT2_checkpoint_{steps[-1]}.tar"
    for run in ("one", "two"):
        assert load_checkpoint(tmp_path / run / final)["progress"]["epoch"] == 2


SLOW_STEPS = "import time, kogpt2.train.trainer as t; s = t.Trainer._step; t.Trainer._step = lambda *a: (time.sleep(0.2), s(*a))[1]"


def workers_of(process: subprocess.Popen) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def slowed(folder):
    """A sitecustomize that slows every step, so the job is surely mid-training when a rank is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{SLOW_STEPS}\n")
    return {"PYTHONPATH": str(folder)}


def test_killing_one_rank_ends_the_job_promptly(tmp_path):
    import os

    env = {**os.environ, **slowed(tmp_path / "site")}
    process = torchrun(*TINY, "--epoch", 50, "--batch_size", 2, "--save_path", tmp_path / "run", env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    workers = workers_of(process)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    process.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert process.returncode != 0


def test_elastic_restart_resumes_from_the_newest_checkpoint(tmp_path):
    import os

    env = {**os.environ, **slowed(tmp_path / "site")}
    folder = tmp_path / "run"
    process = torchrun(*TINY, "--epoch", 2, "--batch_size", 2, "--save_every", 2, "--save_path", folder,
                       "--load_path", folder, extra=("--max_restarts", "1"), env=env)
    deadline = time.monotonic() + 120
    while not list(folder.glob("KoGPT2_checkpoint_*.tar")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    os.kill(workers_of(process)[1], signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "resuming from" in out
    assert load_checkpoint(folder / "KoGPT2_best.tar")["progress"]["epoch"] >= 1
    assert [m["step"] for m in metrics(folder)] == list(range(1, metrics(folder)[-1]["step"] + 1))


def test_a_rank_0_pause_longer_than_a_minute_does_not_abort_the_job(tmp_path):
    """Rank 0 alone evaluates, samples and writes checkpoints while the others wait in a collective: a slow disk or a
    first compile can take minutes there, and the job must wait for it (the old 60 s timeout aborted it)."""
    import os

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "import os, time, kogpt2.train.trainer as t\ne = t.Trainer._evaluate\n"
        "t.Trainer._evaluate = lambda self: (time.sleep(65) if os.environ.get('RANK') == '0' else None, e(self))[1]\n")
    process = torchrun(*TINY, "--epoch", 1, "--batch_size", 2, "--save_path", tmp_path / "run",
                       env={**os.environ, "PYTHONPATH": str(site)})
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    assert list((tmp_path / "run").glob("KoGPT2_checkpoint_*.tar"))
