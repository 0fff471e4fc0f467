"""Perplexity of a checkpoint (or a pretrained model) on a CSV column: the number main.py logs as val_ppl.

    python -m kogpt2.evaluate --load_path checkpoint/KoGPT2_best.tar --data_file_path valid.csv
    python -m kogpt2.evaluate --load_path checkpoint/KoGPT2_best.tar --split val   # the run's own validation rows
"""
from __future__ import annotations

import argparse
import math
import sys

from .arguments import Parser, device, integer
from .defaults import (
    BATCH_SIZE,
    DATA_FORMATS,
    DEVICE,
    EVAL_SPLIT,
    PRECISION,
    PRETRAINED,
    SEED,
    TEXT_COLUMN,
    TXT_UNITS,
    VAL_RATIO,
)
from .errors import KoGPT2Error, report_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m kogpt2.evaluate", description="체크포인트의 퍼플렉시티 / " + __doc__)
    parser.add_argument("--load_path", default=None,
                        help="평가할 체크포인트 또는 폴더 (그 안의 최고 체크포인트); 없으면 --pretrained / checkpoint "
                             "to evaluate, or a folder (its best checkpoint); without it: --pretrained")
    parser.add_argument("--pretrained", default=PRETRAINED,
                        help="--load_path가 없을 때 평가할 모델 / model to evaluate without --load_path")
    parser.add_argument("--data_file_path", default=None,
                        help="텍스트 열이 있는 CSV, .txt, .jsonl / CSV or TSV with the text column, a .txt or a "
                             ".jsonl (default: the file the checkpoint was trained on)")
    parser.add_argument("--split", default=EVAL_SPLIT, choices=["all", "val"],
                        help="all: CSV의 모든 행; val: 학습 때 검증용으로 떼어 둔 행만 / all: every row of the CSV; val: "
                             "only the rows the run held out for validation (the "
                             "log's val_ppl; rows it trained on score lower)")
    parser.add_argument("--column", default=None,
                        help=f"텍스트가 든 CSV 열 / CSV column holding the text (default: the checkpoint's, else "
                             f"{TEXT_COLUMN})")
    parser.add_argument("--encoding", default=None,
                        help="CSV 인코딩 / CSV encoding (default: detect UTF-16 with BOM, UTF-8, CP949/EUC-KR)")
    parser.add_argument("--format", default=None, choices=DATA_FORMATS,
                        help="데이터 파일 형식 / data file format (default: as the run read its own file, else by "
                             "suffix: .csv, .tsv, .txt, .jsonl)")
    parser.add_argument("--txt_unit", default=None, choices=TXT_UNITS,
                        help=".txt의 텍스트 단위: 줄 또는 문단 / a .txt's text: each line or each paragraph (default: as "
                             "the run read its own file, else auto)")
    parser.add_argument("--max_len", type=integer(8), default=None,
                        help="블록 크기 / block size (default: the checkpoint's training one, else 256)")
    parser.add_argument("--batch_size", type=integer(1), default=BATCH_SIZE,
                        help="한 번에 계산할 블록 수 / blocks per forward pass")
    parser.add_argument("--no_cache", action="store_true",
                        help="CSV의 토큰 캐시를 읽지도 쓰지도 않음 / do not read or write the CSV's token cache")
    parser.add_argument("--device", type=device, default=DEVICE,
                        help="장치: auto (cuda, mps, cpu 순), cpu, cuda, cuda:N, mps / auto (cuda, mps, cpu), cpu, "
                             "cuda, cuda:N, mps")
    parser.add_argument("--precision", default=PRECISION, choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16을 지원하는 GPU는 bf16, 구형 GPU는 fp16, CPU는 fp32 / auto: bf16 autocast on "
                             "GPUs that have it, fp16 on older GPUs, fp32 on the CPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        loss, tokens, path = perplexity_of(args)
        rows = "validation rows" if args.split == "val" else "rows"
        print(f"perplexity {math.exp(min(loss, 50)):.4f} (loss {loss:.6f}) over {tokens} tokens of the {rows} of {path}")
        return 0

    return report_errors(work)


def perplexity_of(args: argparse.Namespace) -> tuple[float, int, str]:
    from .corpus.packing import open_corpus
    from .defaults import ANSWER_COLUMN, MAX_LEN, QUESTION_COLUMN
    from .runtime import pick_device, pick_precision
    from .store.checkpoint import open_like_run
    from .store.opening import open_model
    from .train.batch_loss import evaluate

    device = pick_device(args.device)
    opened = open_model(args.load_path, args.pretrained, device, "fp32")
    record = opened.record
    recorded = record.args if record else {}
    path = args.data_file_path or (record.data_path if record else None)
    if not path:
        raise KoGPT2Error("give the CSV to evaluate with --data_file_path")
    if args.split == "val" and (record is None or not recorded):
        raise KoGPT2Error("--split val needs a checkpoint written by main.py (it records which rows were held out)")
    if args.split == "val" and recorded.get("val_file"):
        path = recorded["val_file"]
    model, tokenizer = opened.model, opened.tokenizer
    max_len = args.max_len or recorded.get("max_len") or min(MAX_LEN, model.config.n_positions)
    if max_len > model.config.n_positions:
        raise KoGPT2Error(f"--max_len {max_len} is longer than the model's {model.config.n_positions} positions")
    csv = open_like_run(path, args.encoding, args.format, args.txt_unit, record)
    if args.split == "val" and not recorded.get("val_file") and record.data_sha256 not in (None, csv.sha256):
        raise KoGPT2Error(f"{path} changed since the checkpoint was trained on it: its validation rows are unknown")
    chat = opened.chat  # answers only, as the run's val_ppl
    corpus = open_corpus(csv, chat, args.column or (record.column if record and record.column and not chat else TEXT_COLUMN),
                         recorded.get("question_column", QUESTION_COLUMN), recorded.get("answer_column", ANSWER_COLUMN),
                         recorded.get("dialogue_column"), not args.no_cache, recorded.get("seed", SEED))
    if args.split == "val" and not recorded.get("val_file"):
        _, data = corpus.pack(tokenizer, max_len, recorded.get("val_ratio", VAL_RATIO))
        if data is None:
            raise KoGPT2Error("the run held out no validation rows (too few rows, or --val_ratio 0)")
    else:
        data, _ = corpus.pack(tokenizer, max_len, 0)
    loss = evaluate(model, data, args.batch_size, pick_precision(args.precision, device), progress=True)
    return loss, int(data.real_tokens.sum()), str(path)


if __name__ == "__main__":
    sys.exit(main())
