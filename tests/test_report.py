"""Evaluation, copy detection, plots and export: numbers a user can trust about what the model learnt."""
import json
import struct

import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE_CSV, TINY_TRAINING, run_generator, run_main
from kogpt2.checkpoint import load_checkpoint, model_from_checkpoint
from kogpt2.data import load_rows, pack
from kogpt2.evaluate import main as evaluate_main
from kogpt2.export import main as export_main
from kogpt2.plot import plot_metrics
from kogpt2.report import RunIndex, TrainingText, distinct_n
from kogpt2.scratch import train_tokenizer

ROWS = ["오늘 아침에는 창문을 열었다.", "우리 동네 빵집은 새벽에 문을 연다.", "고양이는 햇볕이 드는 자리를 찾는다.",
        "비 오는 날이면 옛날 노래를 듣는다.", "동생은 라면에 계란을 두 개 넣는다."]


def write_csv(path, rows):
    path.write_text("score,genre,sent\n" + "".join(f"1,x,{r}\n" for r in rows), encoding="utf-8")
    return path


# ---- perplexity ------------------------------------------------------------------------------------------------

def test_perplexity_equals_the_training_log_and_a_direct_computation(tmp_path, capsys):
    val = write_csv(tmp_path / "val.csv", ROWS)
    out = tmp_path / "run"
    assert run_main("--epoch", 3, "--save_path", out, "--val_file", val, *TINY_TRAINING) == 0
    best = load_checkpoint(out / "KoGPT2_best.tar")
    capsys.readouterr()
    assert evaluate_main(["--load_path", str(out / "KoGPT2_best.tar"), "--data_file_path", str(val),
                          "--max_len", "64", "--batch_size", "3"]) == 0
    printed = capsys.readouterr().out
    loss = float(printed.split("(loss ")[1].split(")")[0])
    assert abs(loss - best["progress"]["best_val_loss"]) < 1e-5

    model, tokenizer = model_from_checkpoint(best, "best")
    rows, _ = load_rows(val, "sent", None, tokenizer)
    data = pack(rows, 64, tokenizer.pad_id)
    with torch.no_grad():
        logits = model.eval()(data.blocks[:, :-1])
    targets = data.blocks[:, 1:].clone()
    targets[torch.arange(64)[None, :] >= data.real_tokens[:, None]] = -100
    direct = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
    assert abs(direct - loss) < 1e-5


# ---- copy detection and diversity -----------------------------------------------------------------------------

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


# ---- plots ------------------------------------------------------------------------------------------------------

def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_loss_png_is_drawn_from_the_log(trained, tmp_path):
    assert (trained / "loss.png").is_file()  # written at the end of training
    log = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    first = plot_metrics(tmp_path).read_bytes()
    width, height = png_size(tmp_path / "loss.png")
    assert (width, height) == (990, 550) and len(first) > 20_000
    log[-1]["val_loss"] = 0.01
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    assert plot_metrics(tmp_path).read_bytes() != first


# ---- export -------------------------------------------------------------------------------------------------------

def trained_and_exported(release_folder, tmp_path):
    """One epoch from a release, exported: (our model, our tokenizer, transformers' model, transformers' tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert run_main("--epoch", 1, "--pretrained", release_folder, "--save_path", out, "--max_len", 32,
                    "--batch_size", 32, "--val_ratio", 0) == 0
    checkpoint = next(out.glob("KoGPT2_checkpoint_*.tar"))
    assert export_main([str(checkpoint), str(tmp_path / "hf")]) == 0
    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    return (model.eval(), tokenizer, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(),
            AutoTokenizer.from_pretrained(tmp_path / "hf"))


def same_logits(model, hf_model, tokenizer):
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("오늘 아침에는")])
    with torch.no_grad():
        return (hf_model(ids).logits - model(ids)).abs().max() <= 1e-4


def test_v2_export_loads_in_transformers_with_the_same_logits_and_ids(v2_release, tmp_path, capsys):
    folder, _ = v2_release("safetensors")
    model, tokenizer, hf_model, hf_tokenizer = trained_and_exported(folder, tmp_path)
    for text in ("우리 집은 우리 친구들에게 따뜻한 손길을 줄 수 있는 곳입니다.", "이모지 😀 와\n줄바꿈"):
        assert hf_tokenizer.encode(text) == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id and hf_tokenizer.pad_token_id == tokenizer.pad_id
    assert same_logits(model, hf_model, tokenizer)


def test_half_generation_file_is_small_and_generates(trained, tmp_path, capsys):
    target = tmp_path / "small.tar"
    assert export_main([str(trained / "KoGPT2_best.tar"), str(target), "--half"]) == 0
    full = (trained / "KoGPT2_best.tar").stat().st_size
    assert target.stat().st_size < full / 3  # no optimizer state, half-size weights (the tokenizer stays)
    assert load_checkpoint(target)["model_state_dict"]["transformer.wte.weight"].dtype == torch.bfloat16
    capsys.readouterr()
    assert run_generator("--load_path", target, "--tmp_sent", "오늘", "--seed", 1, "--text_size", 5) == 0
    assert capsys.readouterr().out.startswith("오늘")


def test_v1_export_keeps_every_id_and_the_exact_gelu(v1_release, tmp_path):
    import csv as csv_module

    folder, _ = v1_release
    model, tokenizer, hf_model, hf_tokenizer = trained_and_exported(folder, tmp_path)
    assert hf_model.config.activation_function == "gelu"
    with SAMPLE_CSV.open(encoding="utf-8") as f:
        texts = [row["sent"] for row in csv_module.DictReader(f)]
    texts += ["가나 😀😀 다\n\n라  마 ㅋㅋ ABC 123 龘", "  앞뒤 공백  ", "탭\t문자", "첫 줄 \n 둘째", "\n시작", "ＡＢＣ １２３",
              "<usr>오늘 뭐 해?<sys>집에서 쉬어요", "질문<usr>\n<sys> 답"]
    for text in texts:
        assert hf_tokenizer.encode(text) == tokenizer.encode(text), text
    assert hf_tokenizer.pad_token_id == tokenizer.pad_id == 3
    assert same_logits(model, hf_model, tokenizer)


def test_tensorboard_flag_logs_or_says_how_to_install(tmp_path, capsys):
    import importlib.util

    code = run_main("--epoch", 1, "--save_path", tmp_path, "--tensorboard", *TINY_TRAINING)
    if importlib.util.find_spec("tensorboard") is None:
        assert code == 2 and "--tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    else:
        assert code == 0 and list((tmp_path / "tensorboard").iterdir())
