"""loss.png from a run's metrics.jsonl."""
import json
import shutil
import struct
import warnings

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


def test_a_korean_font_installed_after_matplotlibs_font_cache_is_used(tmp_path, monkeypatch):
    """matplotlib's cached font list predates the install: the plot is still drawn with Korean labels."""
    import matplotlib.pyplot as plt
    from matplotlib import figure, font_manager

    from kogpt2.plot import KOREAN_FONTS

    manager = font_manager.fontManager
    cached = [font for font in manager.ttflist if font.name not in KOREAN_FONTS]  # cached before the install
    monkeypatch.setattr(manager, "ttflist", cached)
    installed = tmp_path / "fonts" / "NanumGothic.ttf"  # on disk since: a real font file, read under Nanum's name
    installed.parent.mkdir()
    shutil.copy(font_manager.findfont("DejaVu Sans"), installed)
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [f.fname for f in cached] + [str(installed)])
    monkeypatch.setattr(manager, "addfont", lambda path: manager.ttflist.append(
        font_manager.FontEntry(fname=str(path), name="NanumGothic")))
    monkeypatch.setitem(plt.rcParams, "font.family", plt.rcParams["font.family"])
    titles = []
    save = figure.Figure.savefig
    monkeypatch.setattr(figure.Figure, "savefig", lambda self, *a, **k: titles.append(self.axes[0].get_title())
                        or save(self, *a, **k))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.5, "val_loss": 3.6, "val_ppl": 36.6}]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stand-in font has no Hangul glyphs
        plot_metrics(tmp_path)
    assert titles == ["학습 곡선"] and plt.rcParams["font.family"] == ["NanumGothic"]


def test_plot_takes_the_log_file_itself(trained, tmp_path, capsys):
    from kogpt2.plot import main

    log = tmp_path / "metrics.jsonl"
    log.write_bytes((trained / "metrics.jsonl").read_bytes())
    assert main([str(log)]) == 0
    assert capsys.readouterr().out.strip() == f"written: {tmp_path / 'loss.png'}"
    assert png_size(tmp_path / "loss.png") == (990, 550)
    assert main([str(tmp_path / "nothing.jsonl")]) == 2
    assert "no metrics log" in capsys.readouterr().err
