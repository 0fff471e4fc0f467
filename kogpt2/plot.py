"""loss.png from a run's metrics.jsonl: train and validation loss, validation perplexity, the best step.

    python -m kogpt2.plot checkpoint/                 # writes checkpoint/loss.png
    python -m kogpt2.plot checkpoint/metrics.jsonl    # the same
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .arguments import Parser
from .errors import KoGPT2Error, report_errors, write_error

KOREAN_FONTS = ("NanumGothic", "NanumBarunGothic", "Noto Sans CJK KR", "Noto Sans KR", "Malgun Gothic", "AppleGothic",
                "UnDotum", "Baekmuk Gulim")
LABELS = {
    True: {"title": "학습 곡선", "step": "스텝", "loss": "손실", "train": "학습 손실", "val": "검증 손실",
           "ppl": "검증 퍼플렉시티", "best": "최고 (스텝 {step})"},
    False: {"title": "Training curve", "step": "step", "loss": "loss", "train": "train loss", "val": "validation loss",
            "ppl": "validation perplexity", "best": "best (step {step})"},
}


def korean_font() -> str | None:
    """An installed font with Hangul, so Korean labels never turn into boxes. matplotlib lists the fonts it found when
    it built its font cache; when none of those has Hangul, the system's font files it has not read yet are read once,
    so a font installed since (``apt-get install fonts-nanum``) is used at once, without deleting that cache."""
    from matplotlib import font_manager

    manager = font_manager.fontManager

    def listed() -> str | None:
        names = {font.name for font in manager.ttflist}
        return next((name for name in KOREAN_FONTS if name in names), None)

    if listed() is None:
        known = {font.fname for font in manager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                try:
                    manager.addfont(path)
                except Exception:  # a file FreeType cannot read: matplotlib's own scan skips it the same way
                    continue
    return listed()


def plot_metrics(folder: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    if folder.suffix == ".jsonl" and not folder.is_dir():
        folder, log = folder.parent, folder
    else:
        log = folder / "metrics.jsonl"
    try:
        entries = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise KoGPT2Error(f"{log}: no metrics log (main.py writes it into --save_path)") from None
    except ValueError:
        raise KoGPT2Error(f"{log} is damaged (not JSON lines)") from None
    if not entries:
        raise KoGPT2Error(f"{log} is empty: nothing to plot yet")
    font = korean_font()
    words = LABELS[font is not None]
    if font:
        plt.rcParams["font.family"] = font
    plt.rcParams["axes.unicode_minus"] = False
    figure, loss_axis = plt.subplots(figsize=(9, 5), dpi=110)
    loss_axis.plot([e["step"] for e in entries], [e["train_loss"] for e in entries], color="#9ab", lw=1,
                   label=words["train"])
    evals = [e for e in entries if "val_loss" in e]
    if evals:
        loss_axis.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="#c33", ms=3,
                       label=words["val"])
        best = min(evals, key=lambda e: e["val_loss"])
        loss_axis.scatter([best["step"]], [best["val_loss"]], s=160, facecolors="none", edgecolors="k", zorder=3,
                          label=words["best"].format(step=best["step"]))
        ppl_axis = loss_axis.twinx()
        ppl_axis.plot([e["step"] for e in evals], [e["val_ppl"] for e in evals], ":", color="#36a", label=words["ppl"])
        ppl_axis.set_ylabel(words["ppl"])
        ppl_axis.legend(loc="upper center")
    loss_axis.set_xlabel(words["step"])
    loss_axis.set_ylabel(words["loss"])
    loss_axis.set_title(words["title"])
    loss_axis.legend(loc="upper right")
    loss_axis.grid(alpha=0.3)
    target = folder / "loss.png"
    figure.tight_layout()
    try:
        figure.savefig(target)
    except OSError as error:
        target.unlink(missing_ok=True)  # no half-written picture left behind
        raise write_error(target, error, f"draw it with: python -m kogpt2.plot {folder}") from None
    finally:
        plt.close(figure)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m kogpt2.plot", description="학습 곡선 그리기 / " + __doc__)
    parser.add_argument("run", help="main.py의 --save_path 폴더 또는 그 안의 metrics.jsonl / main.py's --save_path "
                                    "folder, or its metrics.jsonl")
    args = parser.parse_args(argv)
    return report_errors(lambda: print(f"written: {plot_metrics(args.run)}") or 0)


if __name__ == "__main__":
    sys.exit(main())
