"""main.py: fine-tunes, logs, keeps checkpoints, resumes exactly, stops safely, and refuses bad input clearly."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import numpy as np
import torch

from conftest import REPO, SAMPLE_CSV, TINY_TRAINING, TRAINED_EPOCHS, run_generator, run_main, slowed_main
from kogpt2.checkpoint import load_checkpoint
from kogpt2.data import pack, read_text_column, tokenize_rows

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
    assert payload["data"]["sha256"] == read_text_column(SAMPLE_CSV).sha256
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


def test_every_character_survives(tmp_path, v2_tokenizer_json):
    from kogpt2.tokenizer import load_tokenizer

    texts = ["마지막 글자까지!", "첫 줄\n둘째 줄.", "따옴표 \"안\"의, 쉼표?", "끝에 점..."]
    csv = tmp_path / "lines.csv"
    csv.write_text("score,genre,sent\n" + "".join(f'1,x,"{t.replace(chr(34), chr(34) * 2)}"\n' for t in texts),
                   encoding="utf-8")
    column = read_text_column(csv)
    assert column.texts == texts
    tokenizer = load_tokenizer(v2_tokenizer_json)
    tokenized = tokenize_rows(column.texts, tokenizer)
    rows = [tokenized.row(i) for i in range(len(tokenized))]
    packed = pack(tokenized, 8, tokenizer.pad_id)
    stream = packed.blocks[:, :-1].reshape(-1).tolist() + [packed.blocks[-1, -1].item()]
    assert stream[:packed.tokens] == [t for row in rows for t in row]
    for row, text in zip(rows, texts):
        assert row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
        assert tokenizer.decode(row) == text


def test_korean_excel_encodings_load_the_same_rows(tmp_path):
    text = "score,genre,sent\n1,일상,한글 문장입니다.\n2,시,\"여러 줄\n시\"\n3,x,\n"
    for name, encoding in (("utf8", "utf-8"), ("bom", "utf-8-sig"), ("cp949", "cp949"), ("euckr", "euc-kr")):
        (tmp_path / f"{name}.csv").write_bytes(text.encode(encoding))
    want = read_text_column(tmp_path / "utf8.csv")
    assert want.texts == ["한글 문장입니다.", "여러 줄\n시"] and want.rows_empty == 1
    for name in ("bom", "cp949", "euckr"):
        assert read_text_column(tmp_path / f"{name}.csv").texts == want.texts


@pytest.mark.parametrize("content, column, message", [
    (None, "sent", "no such file"),
    (b"", "sent", "is empty"),
    (b"score,genre,text\n1,a,hello\n", "sent", "no column 'sent' (columns found: score, genre, text)"),
    (b"score,genre,sent\n1,a,\n2,b,  \n", "sent", "column 'sent' has no text in any of its 2 rows"),
    (b"\xff\xfe\x00\x01\x02garbage\x80\x81", "sent", "is neither UTF-8 nor CP949"),
])
def test_bad_csv_is_one_clear_line_and_exit_2(tmp_path, capsys, content, column, message):
    csv = tmp_path / "input.csv"
    if content is not None:
        csv.write_bytes(content)
    assert run_main("--data_file_path", csv, "--column", column, "--save_path", tmp_path, *TINY_TRAINING) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(csv) in err


def test_offline_pretrained_fails_fast_through_the_cli(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "main.py", "--pretrained", "skt/kogpt2-base-v2", "--save_path", tmp_path],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot get skt/kogpt2-base-v2") and "Traceback" not in result.stderr


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
    assert "vocabulary has 50000 tokens but the tokenizer has 51200" in err


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


def test_tokenized_rows_are_cached_next_to_the_csv(tmp_path, v2_tokenizer_json, monkeypatch):
    import kogpt2.data as data
    from kogpt2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(v2_tokenizer_json)
    csv = tmp_path / "train.csv"
    csv.write_text("sent\n첫 문장\n둘째 문장\n", encoding="utf-8")
    first, info = data.load_rows(csv, "sent", None, tokenizer)
    assert len(list(tmp_path.glob(".train.csv.*.kogpt2cache.npz"))) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_parse", no_parsing)
        again, info_again = data.load_rows(csv, "sent", None, tokenizer)
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.offsets, again.offsets)
    assert (info_again.rows_read, info_again.sha256) == (2, info.sha256)

    csv.write_text("sent\n바뀐 문장\n", encoding="utf-8")
    changed, _ = data.load_rows(csv, "sent", None, tokenizer)
    assert len(changed) == 1 and len(list(tmp_path.glob(".train.csv.*.kogpt2cache.npz"))) == 1
