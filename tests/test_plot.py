"""loss.png from a run's metrics.jsonl."""
import json
import struct

from kogpt2.plot import plot_metrics


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




def test_plot_takes_the_log_file_itself(trained, tmp_path, capsys):
    from kogpt2.plot import main

    log = tmp_path / "metrics.jsonl"
    log.write_bytes((trained / "metrics.jsonl").read_bytes())
    assert main([str(log)]) == 0
    assert capsys.readouterr().out.strip() == f"written: {tmp_path / 'loss.png'}"
    assert png_size(tmp_path / "loss.png") == (990, 550)
    assert main([str(tmp_path / "nothing.jsonl")]) == 2
    assert "no metrics log" in capsys.readouterr().err
