"""Never lose work, never run hostile code, never crash on bad input."""
import csv
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import (
    REPO,
    SAMPLE_CSV,
    TINY_TRAINING,
    TRAINED_EPOCHS,
    run_generator,
    run_main,
    slowed_main,
    tiny_hf_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kogpt2.corpus.reading import CsvColumn
from kogpt2.errors import KoGPT2Error
from kogpt2.store.checkpoint import load_checkpoint, read_record

# ---- 1. crash anywhere --------------------------------------------------------------------------------------------

def newest_checkpoint(folder):
    found = sorted(folder.glob("KoGPT2_checkpoint_*.tar"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return found[-1] if found else None


@pytest.mark.slow
def test_sigkill_at_20_random_moments_then_resume_equals_one_run(tmp_path):
    args = ["--epoch", 3, "--data_file_path", SAMPLE_CSV, *TINY_TRAINING, "--save_every", 2, "--keep_last", 2]
    assert run_main(*args, "--save_path", tmp_path / "straight") == 0
    folder = tmp_path / "crashing"
    folder.mkdir()
    rng = random.Random(1234)
    resume = ["--load_path", folder]  # its newest checkpoint; none yet (killed before the first save): start over
    for kill in range(20):
        metrics = folder / "metrics.jsonl"
        before = metrics.stat().st_size if metrics.exists() else 0
        process = subprocess.Popen([sys.executable, "-c", slowed_main(0.02, slow_saves=True), *map(str, args),
                                    "--save_path", str(folder), *map(str, resume)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:  # wait until it really trains
            if metrics.exists() and metrics.stat().st_size > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        process.send_signal(signal.SIGKILL)
        assert process.wait() in (0, -signal.SIGKILL)  # never refused, whenever the last one died
        for checkpoint in folder.glob("*.tar"):  # nothing torn was ever put in place of a good file
            load_checkpoint(checkpoint)
    assert run_main(*args, "--save_path", folder, *resume) == 0
    want = load_checkpoint(newest_checkpoint(tmp_path / "straight"))
    got = load_checkpoint(newest_checkpoint(folder))
    for key in ("model_state_dict",):
        for name, tensor in want[key].items():
            assert torch.equal(tensor, got[key][name]), name
    for a, b in zip(want["optimizer_state_dict"]["state"].values(), got["optimizer_state_dict"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(folder.glob(".*.tmp"))


# ---- 2. torn and corrupt checkpoints ---------------------------------------------------------------------------

def test_truncated_checkpoint_is_refused_and_never_restarts(trained, tmp_path, capsys):
    data = (trained / "KoGPT2_best.tar").read_bytes()
    out = tmp_path / "out"
    for cut in range(10):
        broken = tmp_path / f"cut{cut}.tar"
        broken.write_bytes(data[:int(len(data) * cut / 10) + 7])
        assert run_main("--load_path", broken, "--save_path", out, *TINY_TRAINING) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(broken) in err and "is truncated or corrupt" in err
        assert err.endswith("use an earlier checkpoint or copy it again")  # no cut-off internal zip message
    assert not out.exists()  # no training started from anything else


def test_flipped_bytes_are_refused_or_harmless(trained, tmp_path):
    original = load_checkpoint(trained / "KoGPT2_best.tar")
    data = (trained / "KoGPT2_best.tar").read_bytes()
    rng = random.Random(7)
    refused = 0
    for trial in range(10):
        damaged = bytearray(data)
        for _ in range(3):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{trial}.tar"
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(path)
        except KoGPT2Error as error:
            assert str(path) in str(error) and "\n" not in str(error)
            refused += 1
            continue
        for name, tensor in original["model_state_dict"].items():  # a flip in zip padding changes nothing
            assert torch.equal(tensor, loaded["model_state_dict"][name])
    assert refused >= 8


# ---- 3. disk full -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("background", [False, True], ids=["in place", "in the background"])
def test_disk_full_stops_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, background):
    """Also where checkpoints are written while training goes on (a GPU's way): the failure reaches the run at
    its next checkpoint, with the same line."""
    from kogpt2.train import trainer

    monkeypatch.setattr(trainer, "writes_in_background", lambda device: background)
    real_save = torch.save
    calls = []

    def filling_disk(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_disk)
    assert run_main("--epoch", 2, "--save_path", tmp_path, *TINY_TRAINING, "--save_every", 3) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    free = re.escape(f" MB free in {tmp_path}); free space, then resume with --load_path ")
    assert re.fullmatch(re.escape(f"error: could not write checkpoint {tmp_path / 'KoGPT2_checkpoint_6.tar'}: the "
                                  "disk is full (") + r"\d+(\.\d)?" + free
                        + re.escape(str(tmp_path / "KoGPT2_checkpoint_3.tar")), err), err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "KoGPT2_checkpoint_3.tar")["progress"]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["KoGPT2_checkpoint_3.tar", "metrics.jsonl"]


@contextmanager
def file_size_limit(limit: int):
    """The kernel refuses to grow any file of this process past ``limit`` bytes (EFBIG, Python ignores SIGXFSZ), as
    a full disk refuses with ENOSPC: a real failed write, from deep inside torch's zip writer too."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("limit, save_every", [(100_000, 1), (150, 1000)], ids=["checkpoint", "metrics"])
def test_a_write_refused_mid_run_is_one_line_and_loses_nothing(trained, tmp_path, capsys, limit, save_every):
    """torch's zip writer reports a refused write only as "unexpected pos": the run must still say which file, why
    and where to resume, leave no temporary file or half a metrics line, and keep the checkpoint it resumed from.
    150 bytes hold one metrics line and part of the next."""
    last = tmp_path / newest_checkpoint(trained).name
    shutil.copy(trained / last.name, last)
    step = int(last.stem.rsplit("_", 1)[1])
    capsys.readouterr()
    with file_size_limit(limit):
        code = run_main("--epoch", TRAINED_EPOCHS + 1, "--data_file_path", SAMPLE_CSV, "--save_path", tmp_path,
                        "--load_path", tmp_path, "--save_every", save_every, *TINY_TRAINING)
    err = capsys.readouterr().err
    failing = f"checkpoint {tmp_path / f'KoGPT2_checkpoint_{step + 1}.tar'}" if save_every == 1 else \
        tmp_path / "metrics.jsonl"
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.strip().splitlines()[-1] == (
        f"error: could not write {failing}: the file is larger than this system allows (the file size limit, "
        "ulimit -f, or a FAT32 disk's 4 GB); raise the limit or write to another disk, then resume with "
        f"--load_path {last}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [last.name, "metrics.jsonl"]  # no temporary file
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [step + 1]  # whole lines only
    assert load_checkpoint(last)["progress"]["step"] == step


# ---- 4. hostile files -----------------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("cli", ["main", "generator"])
def test_code_running_checkpoint_is_refused_unrun(tmp_path, capsys, cli):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "KoGPT2_checkpoint_1.tar"
    torch.save({"epoch": 0, "model_state_dict": RunsCode(marker), "format_version": 1}, evil)
    if cli == "main":
        code = run_main("--load_path", evil, "--save_path", tmp_path / "out", *TINY_TRAINING)
    else:
        code = run_generator("--load_path", evil, "--tmp_sent", "x")
    assert code == 2 and not marker.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused: loading it would call posix.system" in err


# ---- 5. mismatches ------------------------------------------------------------------------------------------------

def test_config_that_does_not_fit_the_weights_names_both_shapes(trained, tmp_path, capsys):
    payload = load_checkpoint(trained / "KoGPT2_best.tar")
    payload["config"]["n_embd"] = 128
    torch.save(payload, tmp_path / "odd.tar")
    assert run_generator("--load_path", tmp_path / "odd.tar", "--tmp_sent", "x") == 2
    assert "transformer.wte.weight has shape (1000, 64), the config needs (1000, 128)" in capsys.readouterr().err


# ---- 6. CSV fuzzing -----------------------------------------------------------------------------------------------

HANGUL = st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)
CELL_CHARS = st.one_of(HANGUL, st.sampled_from(list("abcXYZ0129 ,\"'\n\r\t.!?;:#-")))
CELLS = st.one_of(st.text(CELL_CHARS, max_size=30), st.just(""), st.just("   "), st.just("NaN"), st.just("nan"),
                  st.integers().map(str), st.floats(allow_nan=True).map(str),
                  st.text(HANGUL, min_size=5000, max_size=12000))


def encodable(text, encoding):
    try:
        text.encode(encoding)
        return True
    except UnicodeEncodeError:
        return False


@st.composite
def csv_files(draw):
    kind = draw(st.sampled_from(["rows", "rows", "rows", "zero_rows", "no_sent_column", "junk"]))
    if kind == "junk":
        return draw(st.binary(min_size=1, max_size=300)), None
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "cp949"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    header = ["score", "genre", "sent"] if kind != "no_sent_column" else ["score", "genre", "text"]
    rows = [] if kind == "zero_rows" else draw(st.lists(st.tuples(st.integers(0, 5), CELLS, CELLS), max_size=12))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=quoting)
    writer.writerow(header)
    for score, genre, sent in rows:
        writer.writerow([score, genre, sent])
    text = buffer.getvalue()
    if not encodable(text, encoding):
        encoding = "utf-8"
    expected = [sent for _, _, sent in rows if sent.strip()] if kind == "rows" else None
    return text.encode(encoding), expected


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(csv_files())
def test_fuzzed_csv_loads_exactly_or_fails_in_one_line(tmp_path_factory, generated):
    content, expected = generated
    path = tmp_path_factory.mktemp("fuzz") / "data.csv"
    path.write_bytes(content)
    try:
        texts = CsvColumn(path).texts
    except KoGPT2Error as error:
        message = str(error)
        assert "\n" not in message and str(path) in message
        assert expected is None or not expected  # only files without text may be refused
        return
    if expected is not None:
        assert texts == expected


def test_fuzz_failures_exit_2_through_the_cli_without_traceback(tmp_path):
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 3)
    result = subprocess.run([sys.executable, "main.py", "--data_file_path", str(junk), "--save_path", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


# ---- 7. interrupted downloads -----------------------------------------------------------------------------------

@pytest.fixture
def hub_files(tmp_path, v2_tokenizer_json):
    folder = tmp_path / "hub-files"
    folder.mkdir()
    hf = tiny_hf_model(51200, "gelu_new")
    hf.config.to_json_file(folder / "config.json")
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    shutil.copy(v2_tokenizer_json, folder / "tokenizer.json")
    return folder


def load_from_hub(hub_url, hf_home, offline=False, tokenizer_only=False):
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO),
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    load = ("from kogpt2.store.opening import load_pretrained_tokenizer\n    print(load_pretrained_tokenizer("
            "'skt/kogpt2-base-v2').vocab_size)" if tokenizer_only else "model, _ = load_pretrained('skt/kogpt2-base-v2')"
            "\n    print(model.config.n_embd, model.num_parameters())")
    code = (f"import sys\nfrom kogpt2 import KoGPT2Error, load_pretrained\ntry:\n    {load}\n"
            "except KoGPT2Error as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def download_cut(hub_files, hf_home, cuts: int):
    """Load skt/kogpt2-base-v2 from a local fake hub whose first ``cuts`` weight downloads stop half-way."""
    from fake_hub import FakeHub

    hub = FakeHub("skt/kogpt2-base-v2", hub_files, cut_file="pytorch_model.bin", cuts=cuts)
    try:
        return load_from_hub(hub.url, hf_home), hub.requests
    finally:
        hub.close()


def test_cut_download_resumes(hub_files, tmp_path):
    result, requests = download_cut(hub_files, tmp_path / "hf", cuts=1)
    assert result.returncode == 0, result.stderr
    assert any("bytes=" in r for r in requests)  # the second request asked only for the rest
    assert result.stdout.split()[0] == "128"


def test_tokenizer_alone_downloads_no_weights(hub_files, tmp_path):
    """A 2020 checkpoint brings its weights; only the release's tokenizer is fetched for it."""
    from fake_hub import FakeHub

    hub = FakeHub("skt/kogpt2-base-v2", hub_files)
    try:
        result = load_from_hub(hub.url, tmp_path / "hf", tokenizer_only=True)
    finally:
        hub.close()
    assert result.returncode == 0 and result.stdout.split() == ["51200"], result.stderr
    assert any("tokenizer.json" in r for r in hub.requests)
    assert not any("pytorch_model" in r or "safetensors" in r for r in hub.requests)


def test_download_that_keeps_failing_is_never_loaded_as_complete(hub_files, tmp_path):
    result, _ = download_cut(hub_files, tmp_path / "hf", cuts=100)
    assert result.returncode == 2 and "downloading skt/kogpt2-base-v2 failed" in result.stderr
    assert "run the same command again to resume" in result.stderr
    offline = load_from_hub("http://127.0.0.1:9", tmp_path / "hf", offline=True)
    assert offline.returncode == 2 and "not in the local Hugging Face cache" in offline.stderr


# ---- 8. generator input ------------------------------------------------------------------------------------------

def test_generator_survives_hostile_input(trained):
    stdin = ("가나다 " * 600 + "\n").encode() + b"\xff\xfe\xfa broken utf-8\n" + "\x01\x07\x1b[31m 제어\n".encode()
    result = subprocess.run([sys.executable, "generator.py", "--load_path", str(trained / "KoGPT2_best.tar"),
                             "--tmp_sent", "", "--text_size", "5", "--seed", "1"], cwd=REPO, input=stdin,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr
    assert b"\xef\xbf\xbd broken utf-8" in result.stdout  # the prompt, with its bad bytes replaced, is echoed


# ---- 9. output whose reader has gone ------------------------------------------------------------------------------
# `python main.py ... 2>&1 | tee log`, then Ctrl-C: tee dies too, and every later print meets a closed pipe.

def start_with_closed_output(*argv) -> subprocess.Popen:
    """A real process whose stdout and stderr are pipes nobody reads any more (their reading ends closed)."""
    process = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    process.stderr.close()
    return process


@pytest.mark.slow
def test_ctrl_c_under_a_closed_pipe_still_saves_the_step_reached(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "-c", slowed_main(0.03), "--epoch", "50", "--data_file_path",
                                str(SAMPLE_CSV), *TINY_TRAINING, "--save_path", str(tmp_path), "--save_every", "1000"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.stdout.close()
    process.stderr.close()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0  # as a Ctrl-C that saved
    reached = json.loads(metrics.read_text().splitlines()[-1])["step"]
    saved = list(tmp_path.glob("KoGPT2_checkpoint_*.tar"))
    assert [path.name for path in saved] == [f"KoGPT2_checkpoint_{reached}.tar"]
    assert read_record(load_checkpoint(saved[0]), saved[0]).resumable


def test_generator_output_file_is_complete_and_exit_0_under_a_closed_pipe(trained, tmp_path):
    prompts, output = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("오늘\n우리는\n", encoding="utf-8")
    process = start_with_closed_output("generator.py", "--load_path", trained / "KoGPT2_best.tar", "--prompts",
                                       prompts, "--output", output, "--text_size", 5, "--seed", 1)
    assert process.wait(timeout=120) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["오늘", "우리는"]


@contextmanager
def closed_output():
    """This process's stdout and stderr as line-buffered pipes (``python -u``) whose reader has gone; set within the
    test itself, as pytest puts its own capture back at each phase."""
    saved, streams = (sys.stdout, sys.stderr), []
    for _ in saved:
        read, write = os.pipe()
        os.close(read)
        streams.append(open(write, "w", encoding="utf-8", buffering=1))
    sys.stdout, sys.stderr = streams
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for stream in streams:
            try:
                stream.close()
            except BrokenPipeError:  # its text had nowhere to go (only without the fix)
                pass


def test_streamed_samples_are_still_saved_under_a_closed_pipe(trained, tmp_path):
    folder = tmp_path / "samples"
    with closed_output():
        code = run_generator("--load_path", trained / "KoGPT2_best.tar", "--samples", folder, "--seed", 4,
                             "--text_size", 5, stdin="하나\n둘\n")
    assert code == 0 and len(list(folder.iterdir())) == 2


def test_server_serves_under_a_closed_pipe(trained):
    pytest.importorskip("fastapi", reason="the server's packages are absent: pip install -r requirements-serve.txt")
    import http.client
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = start_with_closed_output("generator.py", "--load_path", trained / "KoGPT2_best.tar", "--serve",
                                       "--port", port)
    try:
        deadline, status = time.monotonic() + 120, None
        while status is None and process.poll() is None and time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                connection.request("POST", "/v1/completions", json.dumps({"prompt": "오늘", "max_tokens": 3}),
                                   {"Content-Type": "application/json"})
                status = connection.getresponse().status
            except OSError:
                time.sleep(0.1)
        assert status == 200, f"the server exited with {process.poll()}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("flag", ["--output", "--samples", "--report"])
def test_generated_files_on_a_full_disk_are_one_line_and_never_half_written(trained, tmp_path, capsys, flag):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("오늘\n내일\n", encoding="utf-8")
    out = tmp_path / "out"
    source = ["--tmp_sent", "오늘", "--loops", 0] if flag == "--samples" else ["--prompts", prompts]
    target = {"--output": out / "texts.csv", "--samples": out, "--report": out / "report.json"}[flag]
    capsys.readouterr()
    with file_size_limit(60):  # the kernel refuses any file past 60 bytes, as a full disk would
        code = run_generator("--load_path", trained / "KoGPT2_best.tar", *source, flag, target, "--text_size", 20,
                             "--seed", 1)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert re.fullmatch(r"error: could not write .*: the file is larger than this system allows .*, then run it again",
                        err.strip().splitlines()[-1])
    assert [p for p in out.rglob("*") if p.is_file()] == []  # nothing half written


def test_export_on_a_full_disk_is_one_line(trained, tmp_path, capsys):
    from kogpt2.export import main as export

    with file_size_limit(100_000):
        code = export([str(trained / "KoGPT2_best.tar"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(r"error: could not write .*model.safetensors: .*, then export again", err.strip())
    assert not list((tmp_path / "hf").glob(".*.tmp"))
