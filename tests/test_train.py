"""main.py: fine-tunes, logs, keeps checkpoints, resumes exactly, stops safely, and refuses bad input clearly."""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    SAMPLE_CSV,
    TINY_TRAINING,
    TRAINED_EPOCHS,
    ctrl_c_at_step,
    run_generator,
    run_main,
    slowed_main,
)

from kogpt2.corpus.reading import CsvColumn
from kogpt2.store.checkpoint import load_checkpoint


def start_slow_main(*argv) -> subprocess.Popen:
    """main.py in a real separate process, each step slowed so it can be killed in the middle of training."""
    return subprocess.Popen([sys.executable, "-c", slowed_main(0.03), *map(str, argv)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_end_to_end_on_the_sample(trained, capsys):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == TRAINED_EPOCHS and min(val) < val[0] - 1.0
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert {"lr", "train_loss", "tokens_per_s", "epoch"} <= set(metrics[0])
    assert (trained / "KoGPT2_best.tar").is_file()
    kept = sorted(p.name for p in trained.glob("KoGPT2_checkpoint_*.tar"))
    assert len(kept) == 3  # --keep_last default
    payload = load_checkpoint(trained / kept[-1])
    for key in ("epoch", "train_no", "model_state_dict", "optimizer_state_dict", "loss", "config", "tokenizer",
                "rng", "progress", "settings", "format_version"):
        assert key in payload
    assert payload["progress"]["epoch"] == TRAINED_EPOCHS
    assert payload["data"]["sha256"] == CsvColumn(SAMPLE_CSV).sha256
    capsys.readouterr()
    assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--tmp_sent", "오늘", "--seed", "3",
                         "--text_size", "10") == 0
    assert capsys.readouterr().out.startswith("오늘")


def final_state(folder):
    steps = sorted(int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("KoGPT2_checkpoint_*.tar"))
    return load_checkpoint(folder / f"KoGPT2_checkpoint_{steps[-1]}.tar")


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = ("--epoch", 3, "--data_file_path", SAMPLE_CSV, *TINY_TRAINING, "--batch_size", 4, "--save_every", 5,
            "--keep_last", 0)
    assert run_main(*args, "--save_path", tmp_path / "straight") == 0

    killed = tmp_path / "killed"
    process = start_slow_main(*args, "--save_path", killed)
    wait_for(lambda: (killed / "KoGPT2_checkpoint_25.tar").exists())
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = max(killed.glob("KoGPT2_checkpoint_*.tar"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert int(newest.stem.rsplit("_", 1)[1]) < 57  # really stopped mid-run
    assert run_main(*args, "--save_path", killed, "--load_path", newest) == 0

    want, got = final_state(tmp_path / "straight"), final_state(killed)
    assert_same_tensors(want["model_state_dict"], got["model_state_dict"])
    assert_same_tensors(want["optimizer_state_dict"], got["optimizer_state_dict"])
    assert want["progress"] == got["progress"]
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # each step logged once despite the kill


@pytest.mark.slow
def test_sigint_saves_and_exits_zero(tmp_path):
    process = start_slow_main("--epoch", 50, "--data_file_path", SAMPLE_CSV, *TINY_TRAINING,
                              "--save_path", tmp_path, "--save_every", 1000)
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists())
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    saved = list(tmp_path.glob("KoGPT2_checkpoint_*.tar"))
    assert len(saved) == 1 and f"--load_path {saved[0]}" in out
    assert "Traceback" not in err


def test_offline_pretrained_fails_fast_through_the_cli(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "main.py", "--pretrained", "skt/kogpt2-base-v2", "--save_path", tmp_path],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot get skt/kogpt2-base-v2") and "Traceback" not in result.stderr


@pytest.mark.parametrize("where, message", [
    ("data.csv", " is a file, not a folder: give the folder for the checkpoints and metrics (e.g. --save_path "
                 "checkpoint/)"),
    ("KoGPT2_checkpoint_10.tar", " is a file, not a folder: give the folder for the checkpoints and metrics (e.g. "
                                 "--save_path checkpoint/); to continue from this checkpoint, use --load_path {path}"),
    ("data.csv/run", ": cannot write there (Not a directory); give a folder you can write to"),
    ("unwritable", ": cannot write there ({reason}); give a folder you can write to"),
], ids=["csv", "tar", "under-a-file", "unwritable"])
def test_save_path_that_cannot_hold_checkpoints_is_refused_before_any_work(tmp_path, capsys, where, message):
    (tmp_path / "data.csv").write_bytes(SAMPLE_CSV.read_bytes())
    (tmp_path / "KoGPT2_checkpoint_10.tar").write_bytes(b"a checkpoint")
    path, reason = tmp_path / where, None
    if where == "unwritable":  # root may write anywhere but in the kernel's /sys
        path = Path("/sys/kogpt2-test") if os.geteuid() == 0 else tmp_path / "locked" / "run"
        (tmp_path / "locked").mkdir(mode=0o500)
        reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert run_main("--epoch", 1, "--data_file_path", SAMPLE_CSV, "--save_path", path, *TINY_TRAINING) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before any model was made or loaded
    assert err == f"error: --save_path {path}{message.format(path=path, reason=reason)}\n"
    assert (tmp_path / "data.csv").read_bytes() == SAMPLE_CSV.read_bytes()


def test_max_len_beyond_positions_is_refused(tmp_path, capsys):
    assert run_main("--save_path", tmp_path, *TINY_TRAINING, "--max_len", "5000") == 2
    assert "--max_len 5000 is longer than the model's 256 positions" in capsys.readouterr().err


def test_2020_checkpoint_starts_training_with_the_v1_tokenizer(tmp_path, v1_release, capsys):
    folder, hf = v1_release
    old = tmp_path / "KoGPT2_checkpoint_80000.tar"
    torch.save({"epoch": 3, "train_no": 80000, "model_state_dict": hf.state_dict(),
                "optimizer_state_dict": {}, "loss": 2.5}, old)
    out = tmp_path / "out"
    assert run_main("--epoch", 1, "--load_path", old, "--pretrained", folder, "--save_path", out,
                    "--max_len", 32, "--batch_size", 16, "--val_ratio", 0) == 0
    assert "starting from the weights of the 2020 checkpoint" in capsys.readouterr().out
    payload = load_checkpoint(next(out.glob("KoGPT2_checkpoint_*.tar")))
    assert payload["config"]["activation"] == "gelu" and payload["tokenizer"]["kind"] == "sentencepiece"


def test_2020_checkpoint_with_the_v2_tokenizer_is_refused(tmp_path, v1_release, v2_release, capsys):
    _, hf = v1_release
    v2_folder, _ = v2_release("bin")
    old = tmp_path / "old.tar"
    torch.save({"epoch": 0, "train_no": 1, "model_state_dict": hf.state_dict(), "optimizer_state_dict": {}, "loss": 1.0}, old)
    assert run_main("--load_path", old, "--pretrained", v2_folder, "--save_path", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "vocabulary of 50000 tokens but the tokenizer has 51200" in err


def test_finished_run_says_there_is_nothing_to_do(trained, tmp_path, capsys):
    best = trained / "KoGPT2_best.tar"
    assert run_main("--epoch", TRAINED_EPOCHS, "--load_path", best, "--save_path", tmp_path, *TINY_TRAINING) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert math.isfinite(load_checkpoint(best)["progress"]["best_val_loss"])


@pytest.mark.parametrize("precision, tip", [("auto", True), ("bf16", False)])
def test_cpu_with_bf16_instructions_suggests_bf16_once(tmp_path, capsys, monkeypatch, precision, tip):
    import kogpt2.finetune

    monkeypatch.setattr(kogpt2.finetune, "cpu_bf16_instructions", lambda: ["avx512_bf16"])
    assert run_main("--epoch", 1, "--save_path", tmp_path, "--precision", precision, *TINY_TRAINING) == 0
    assert capsys.readouterr().out.count("--precision bf16 trains about 1.8x faster") == tip


def test_tensorboard_flag_logs_or_says_how_to_install(tmp_path, capsys):
    import importlib.util

    code = run_main("--epoch", 1, "--save_path", tmp_path, "--tensorboard", *TINY_TRAINING)
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2 and "--tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    else:
        assert code == 0 and list((tmp_path / "tensorboard").iterdir())


def test_interrupted_scratch_run_resumed_without_its_flags_equals_one_run(tmp_path, monkeypatch, capsys):
    """The resume names no model, rate or size: every setting whose default follows the model (a scratch model's
    learning rate, its resolved warmup, --max_len) comes from the checkpoint, so the run goes on exactly."""
    args = ("--epoch", 2, "--data_file_path", SAMPLE_CSV)
    assert run_main(*args, *TINY_TRAINING, "--save_path", tmp_path / "straight") == 0

    ctrl_c_at_step(monkeypatch, 13)
    assert run_main(*args, *TINY_TRAINING, "--save_path", tmp_path / "cut") == 0
    monkeypatch.undo()
    assert final_state(tmp_path / "cut")["progress"]["step"] == 14  # really stopped mid-run
    capsys.readouterr()
    assert run_main(*args, "--save_path", tmp_path / "cut", "--load_path", tmp_path / "cut") == 0
    banner = next(line for line in capsys.readouterr().out.splitlines() if "checkpoint's settings" in line)
    for flag in ("--lr 0.001", "--warmup 1", "--max_len 64", "--batch_size 8", "--seed 1"):
        assert flag in banner

    want, got = final_state(tmp_path / "straight"), final_state(tmp_path / "cut")
    assert_same_tensors(want["model_state_dict"], got["model_state_dict"])
    assert_same_tensors(want["optimizer_state_dict"], got["optimizer_state_dict"])
    assert want["progress"] == got["progress"] and got["pretrained"] == "scratch:tiny"


def test_resume_banner_prints_flags_as_they_are_typed():
    import main
    from kogpt2.finetune import take_checkpoint_settings

    args, said = main.parse_args([]), []
    take_checkpoint_settings(args, {"chat": True, "column": "my text", "lr": 0.001, "max_len": 64}, set(), said.append)
    flags = said[0].split(": ", 1)[1]
    assert "--chat" in flags and "True" not in flags
    again = main.parse_args(shlex.split(flags))  # the banner, pasted back, means the same run
    assert (again.chat, again.column, again.lr, again.max_len) == (True, "my text", 0.001, 64)

    said.clear()
    take_checkpoint_settings(main.parse_args(["--chat"]), {"chat": False}, {"chat"}, said.append)
    assert said[0].startswith("note: new settings --chat (was off)")


def test_each_loss_is_read_after_the_next_step_is_queued(tmp_path, monkeypatch):
    """A GPU runs step k+1 while the host reads and logs step k: the host never waits between plain steps. The log
    still has every step once, with the loss the checkpoint holds for its last step."""
    from kogpt2.runtime import HostCopy
    from kogpt2.train import trainer

    events = []

    class RecordedCopy(HostCopy):
        def __init__(self, tensor):
            super().__init__(tensor)
            self.step = sum(event[0] == "queued" for event in events) + 1
            events.append(("queued", self.step))

        def read(self):
            events.append(("read", self.step))
            return super().read()

    monkeypatch.setattr(trainer, "HostCopy", RecordedCopy)
    assert run_main("--epoch", 1, "--data_file_path", SAMPLE_CSV, "--save_path", tmp_path, *TINY_TRAINING,
                    "--save_every", 1000) == 0
    steps = max(step for _, step in events)
    assert steps >= 4
    for step in range(1, steps):  # the epoch's last step evaluates and saves: it is read at once
        assert events.index(("queued", step + 1)) < events.index(("read", step)), events
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, steps + 1))
    saved = load_checkpoint(tmp_path / f"KoGPT2_checkpoint_{steps}.tar")
    assert saved["progress"]["loss"] == logged[-1]["train_loss"]


def test_metrics_are_written_in_batches_and_before_each_checkpoint(tmp_path):
    from kogpt2.defaults import METRICS_FLUSH_SECONDS
    from kogpt2.train.metrics_log import MetricsLog

    now = [0.0]
    log = MetricsLog(tmp_path, tensorboard=False, go_on=lambda: "resume", clock=lambda: now[0])
    for step in range(1, 6):
        log.write(step=step, train_loss=1.0)
    # the first line at once (the run has begun), the next four quick steps wait
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1]
    now[0] += METRICS_FLUSH_SECONDS
    log.write(step=6, train_loss=1.0)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    log.write(step=7, train_loss=1.0)
    log.flush()  # what the trainer does before each checkpoint
    assert len(log.path.read_text().splitlines()) == 7


def test_checkpoints_written_in_the_background_are_those_written_in_place(tmp_path, monkeypatch):
    """A GPU's run copies each checkpoint to the host and goes on training while a thread writes it: the files
    are the same as those written in place (the tied weight stored once), and steps run during a write."""
    from kogpt2.train import trainer

    real_save, writes, steps = torch.save, [], []

    def slow_save(obj, file, *args, **kwargs):
        started = time.monotonic()
        time.sleep(0.2)
        real_save(obj, file, *args, **kwargs)
        writes.append((started, time.monotonic()))

    original_step = trainer.Trainer._step

    def timed_step(self, *args):
        steps.append(time.monotonic())
        return original_step(self, *args)

    monkeypatch.setattr(trainer.Trainer, "_step", timed_step)
    args = ("--epoch", 1, "--data_file_path", SAMPLE_CSV, *TINY_TRAINING, "--save_every", 4, "--keep_last", 0)
    assert run_main(*args, "--save_path", tmp_path / "in_place") == 0
    monkeypatch.setattr(trainer, "writes_in_background", lambda device: True)
    monkeypatch.setattr(torch, "save", slow_save)
    steps.clear()
    assert run_main(*args, "--save_path", tmp_path / "background") == 0
    assert any(start < step < end for start, end in writes for step in steps)  # training went on during a write
    names = sorted(p.name for p in (tmp_path / "in_place").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "background").iterdir())
    for name in names:
        if name.endswith(".tar"):
            want, got = (load_checkpoint(tmp_path / run / name) for run in ("in_place", "background"))
            assert want.keys() == got.keys()
            for key in ("model_state_dict", "optimizer_state_dict", "progress", "rng"):
                assert_same_tensors(want[key], got[key])
            size = (tmp_path / "in_place" / name).stat().st_size
            assert abs((tmp_path / "background" / name).stat().st_size - size) < size // 100


def test_ctrl_c_while_a_checkpoint_is_written_in_the_background_keeps_it(tmp_path, monkeypatch, capsys):
    from conftest import ctrl_c_at_step

    from kogpt2.train import trainer

    real_save = torch.save

    def slow_save(obj, file, *args, **kwargs):
        time.sleep(0.5)
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(trainer, "writes_in_background", lambda device: True)
    monkeypatch.setattr(torch, "save", slow_save)
    ctrl_c_at_step(monkeypatch, 3)
    assert run_main("--epoch", 2, "--data_file_path", SAMPLE_CSV, *TINY_TRAINING, "--save_path", tmp_path) == 0
    assert load_checkpoint(tmp_path / "KoGPT2_checkpoint_4.tar")["progress"]["step"] == 4
    assert "resume with --load_path" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp"))



def test_an_error_while_a_background_write_fails_is_the_one_reported(tmp_path, monkeypatch, capsys):
    """A failed background write and, before the run learns of it, another error: the other error is the run's
    last line (the write's is said before it), not hidden behind the write's."""
    import errno

    from kogpt2.errors import KoGPT2Error
    from kogpt2.train import trainer

    def full_disk(obj, file, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    original_step = trainer.Trainer._step

    def failing_step(self, *args):
        if self.progress.step == 3:
            raise KoGPT2Error("out of GPU memory (as if)")
        return original_step(self, *args)

    monkeypatch.setattr(trainer, "writes_in_background", lambda device: True)
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(trainer.Trainer, "_step", failing_step)
    assert run_main("--epoch", 2, "--data_file_path", SAMPLE_CSV, *TINY_TRAINING, "--save_path", tmp_path,
                    "--save_every", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: out of GPU memory (as if)"
    assert any(line.startswith("error: could not write checkpoint") for line in err[:-1])


def test_a_resume_reads_its_data_as_its_run_did(tmp_path, monkeypatch, capsys):
    """A run over a .txt of paragraphs with a validation file, resumed without --format, --txt_unit or --val_file:
    the same blocks and the same validation set, so the same run."""
    paragraphs = "\n\n".join(f"오늘 {i}번째 문단입니다.\n둘째 줄 {i}." for i in range(60))
    (tmp_path / "train.txt").write_text(paragraphs, encoding="utf-8")
    (tmp_path / "val.txt").write_text("검증 문단 하나.\n\n검증 문단 둘.", encoding="utf-8")
    args = ("--epoch", 2, "--data_file_path", tmp_path / "train.txt", "--pretrained", "scratch:tiny", "--max_len", 32,
            "--batch_size", 4, "--seed", 1)
    given = ("--format", "txt", "--txt_unit", "paragraph", "--val_file", tmp_path / "val.txt")
    assert run_main(*args, *given, "--save_path", tmp_path / "straight") == 0
    ctrl_c_at_step(monkeypatch, 3)
    assert run_main(*args, *given, "--save_path", tmp_path / "cut") == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert run_main(*args, "--save_path", tmp_path / "cut", "--load_path", tmp_path / "cut") == 0
    banner = next(line for line in capsys.readouterr().out.splitlines() if "checkpoint's settings" in line)
    assert "--format txt" in banner and "--txt_unit paragraph" in banner and "--val_file" in banner
    want, got = final_state(tmp_path / "straight"), final_state(tmp_path / "cut")
    assert_same_tensors(want["model_state_dict"], got["model_state_dict"])
    assert want["progress"] == got["progress"]
