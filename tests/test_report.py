"""Copy detection and diversity: how much of the generated text is new."""
import json

import pytest
from conftest import ROWS, run_generator, run_main, write_csv

from kogpt2.generation.copy_report import RunIndex, TrainingText, distinct_n
from kogpt2.store.scratch import train_tokenizer


@pytest.fixture(scope="module")
def training_text():
    return TrainingText(ROWS, train_tokenizer(ROWS * 20, vocab_size=300))


def test_copy_rate_one_for_training_rows_zero_for_new_text(training_text):
    assert all(training_text.is_copy(row) for row in ROWS)
    assert training_text.is_copy("  고양이는   햇볕이 드는")  # a piece of a row, whitespace aside
    assert not training_text.is_copy("전혀 다른 문장이 여기에 있다.")
    assert not training_text.is_copy("열었다. 우리 동네")  # across two rows is not a copy of either


def test_longest_shared_run_on_hand_made_cases(training_text):
    index = RunIndex([["a", "b", "c", "d"], ["x", "b", "c", "y", "z"]])
    assert index.longest_shared(["q", "b", "c", "d", "q"]) == 3
    assert index.longest_shared(["b", "c", "y", "z"]) == 4
    assert index.longest_shared(["q"]) == 0
    measured = training_text.measure("나는 비 오는 날이면 옛날 노래를 부른다")
    assert measured["longest_shared_words"] == 5 and not measured["copy"]  # 비 오는 날이면 옛날 노래를
    assert measured["longest_shared_tokens"] >= 5


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n([""], 2) == 0.0


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overfit")
    csv = write_csv(folder / "five.csv", ROWS)
    assert run_main("--epoch", 150, "--data_file_path", csv, "--save_path", folder / "run", "--pretrained",
                    "scratch:tiny", "--max_len", "32", "--batch_size", "1", "--lr", "3e-3", "--val_ratio", "0",
                    "--save_every", "100000", "--keep_last", "1") == 0
    return folder / "run" / next((folder / "run").glob("KoGPT2_checkpoint_*.tar")).name, csv


def test_report_and_no_copy_on_a_model_that_memorised_its_rows(overfit, tmp_path, capsys):
    checkpoint, csv = overfit
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(row.split()[0] + "\n" for row in ROWS), encoding="utf-8")
    common = ["--load_path", checkpoint, "--prompts", prompts, "--num_samples", 2, "--seed", 1, "--temperature", 0.7,
              "--text_size", 30]
    assert run_generator(*common, "--report", tmp_path / "copying.json") == 0
    copying = json.loads((tmp_path / "copying.json").read_text(encoding="utf-8"))
    assert copying["summary"]["copy_rate"] >= 0.5  # it does copy: the check below can fail
    assert run_generator(*common, "--no_copy", "--copy_words", 3, "--report", tmp_path / "new.json") == 0
    new = json.loads((tmp_path / "new.json").read_text(encoding="utf-8"))
    assert new["summary"]["copy_rate"] == 0
    assert all(sample["text"].strip() not in ROWS and sample["longest_shared_words"] <= 3 for sample in new["samples"])
    assert set(new["summary"]) >= {"distinct_1", "distinct_2", "mean_longest_shared_words", "mean_longest_shared_tokens"}




def test_no_copy_redraws_keep_their_place_among_the_samples(overfit, tmp_path):
    checkpoint, _ = overfit
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("오늘\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert run_generator("--load_path", checkpoint, "--prompts", prompts, "--num_samples", 3, "--seed", 1,
                         "--temperature", 0.7, "--text_size", 30, "--no_copy", "--copy_words", 3,
                         "--output", output) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["num_samples"] for row in rows] == [3] * len(rows)
    assert [row["sample_index"] for row in rows] == sorted({row["sample_index"] for row in rows})
    assert all(isinstance(row["stop"], list) for row in rows)


def test_report_reads_the_text_column_the_model_was_trained_on(tmp_path, capsys):
    """A CSV whose text column is not 'sent' (trained with --column) works with --report and --no_copy."""
    csv = write_csv(tmp_path / "lines.csv", ROWS * 20, column="text")
    run = tmp_path / "run"
    assert run_main("--epoch", 1, "--data_file_path", csv, "--column", "text", "--save_path", run, "--pretrained",
                    "scratch:tiny", "--max_len", 32) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("오늘\n", encoding="utf-8")
    for extra in (["--data_file_path", csv], []):
        assert run_generator("--load_path", run, "--prompts", prompts, "--seed", 1, "--text_size", 5, "--no_copy",
                             "--report", tmp_path / "r.json", *extra) == 0
        assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["summary"]["samples"] == 1


def test_report_from_another_folder_says_to_give_the_csv(tmp_path, capsys, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    write_csv(tmp_path / "here" / "lines.csv", ROWS * 20)
    assert run_main("--epoch", 1, "--data_file_path", "lines.csv", "--save_path", tmp_path / "run", "--pretrained",
                    "scratch:tiny", "--max_len", 32) == 0
    monkeypatch.chdir(tmp_path / "elsewhere")  # the checkpoint recorded lines.csv, relative to "here"
    capsys.readouterr()
    assert run_generator("--load_path", tmp_path / "run", "--tmp_sent", "x", "--text_size", 3, "--report", "r.json") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: lines.csv: no such file (the checkpoint's training CSV, relative to where main.py ran); "
                   "give the training CSV with --data_file_path")
