"""python -m kogpt2.evaluate: the perplexity main.py logs, computed again from a checkpoint."""
import torch
import torch.nn.functional as F
from conftest import ROWS, TINY_TRAINING, run_main, write_csv

from kogpt2.corpus.packing import pack
from kogpt2.corpus.reading import CsvColumn
from kogpt2.evaluate import main as evaluate_main
from kogpt2.store.checkpoint import load_checkpoint, read_record
from kogpt2.store.opening import model_from_checkpoint


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

    model, tokenizer = model_from_checkpoint(best, read_record(best, "best"))
    rows = CsvColumn(val).token_rows(tokenizer)
    data = pack(rows, 64, tokenizer.pad_id)
    with torch.no_grad():
        logits = model.eval()(data.blocks[:, :-1])
    targets = data.blocks[:, 1:].clone()
    targets[torch.arange(64)[None, :] >= data.real_tokens[:, None]] = -100
    direct = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
    assert abs(direct - loss) < 1e-5




def test_split_val_gives_the_logs_validation_perplexity(trained, capsys):
    best = load_checkpoint(trained / "KoGPT2_best.tar")
    capsys.readouterr()
    assert evaluate_main(["--load_path", str(trained), "--split", "val"]) == 0  # a folder: its best checkpoint
    printed = capsys.readouterr().out
    loss = float(printed.split("(loss ")[1].split(")")[0])
    assert abs(loss - best["progress"]["best_val_loss"]) < 1e-5 and "validation rows" in printed
    assert evaluate_main(["--load_path", str(trained)]) == 0  # every row: rows it trained on score better
    whole = float(capsys.readouterr().out.split("(loss ")[1].split(")")[0])
    assert whole < loss
