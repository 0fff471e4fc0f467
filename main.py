"""Fine-tune KoGPT2 on the text column of a CSV (or its question/answer pairs, --chat), with resumable checkpoints.

    python main.py --epoch 5 --data_file_path data/sample.csv --save_path checkpoint/
    python main.py --epoch 8 --data_file_path data/sample.csv --save_path checkpoint/ --load_path checkpoint/
"""
import argparse
import sys

from kogpt2 import defaults
from kogpt2.arguments import Parser, device, given_flags, integer, number, projections
from kogpt2.store.scratch import DEFAULT_SIZE, SIZES


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(description="KoGPT2 파인튜닝 / fine-tune KoGPT2 on the text column of a CSV.")
    p.add_argument("--epoch", type=integer(1), default=defaults.EPOCHS,
                   help="학습할 전체 에폭 수 (이어 학습도 이 에폭까지) / total epochs of the run (a resume continues up to "
                        "this)")
    p.add_argument("--data_file_path", default=defaults.DATA_FILE,
                   help="학습 데이터: CSV/TSV (열 score,genre,sent), .txt, .jsonl / training data: a CSV or TSV "
                        "(columns score,genre,sent), a .txt or a .jsonl (see --format)")
    p.add_argument("--save_path", default=defaults.SAVE_PATH,
                   help="체크포인트와 metrics.jsonl을 쓸 폴더 / folder for checkpoints and metrics.jsonl")
    p.add_argument("--load_path", default=None,
                   help="이어 학습할 체크포인트 (폴더면 가장 최근 것); 없으면 --pretrained에서 시작 / checkpoint to continue "
                        "from (a folder: its newest checkpoint); if there is none, start from --pretrained")
    p.add_argument("--batch_size", type=integer(1), default=defaults.BATCH_SIZE, help="배치당 블록 수 / blocks per batch")
    p.add_argument("--samples", default=None,
                   help="학습 중 출력한 샘플을 저장할 폴더 / folder where the samples printed during training are saved")
    p.add_argument("--pretrained", default=defaults.PRETRAINED,
                   help=f"시작할 모델: 허브 id, 폴더, 이 도구가 쓴 .tar, 또는 CSV만으로 처음부터 배우는 scratch[:크기] / "
                        f"model to start from (default: {defaults.PRETRAINED}): a hub id, a folder (config.json + "
                        "weights + tokenizer.json, or v1 *.params + *.spiece), a .tar this tool wrote, or "
                        f"scratch[:SIZE] to learn a tokenizer and a fresh GPT-2 from the CSV alone; sizes: "
                        f"{', '.join(SIZES)} (scratch alone: {DEFAULT_SIZE})")
    p.add_argument("--vocab_size", type=integer(100), default=None,
                   help="--pretrained scratch의 토크나이저 크기 / tokenizer size for --pretrained scratch (default: from the "
                        "amount of text)")
    p.add_argument("--dropout", type=number(0, 0.99), default=None,
                   help="파인튜닝 중 드롭아웃 비율 / dropout rate while fine-tuning, in [0, 0.99] (default: the model's)")
    p.add_argument("--column", default=defaults.TEXT_COLUMN,
                   help=f"텍스트가 든 CSV 열 (.jsonl은 키) / CSV column holding the text (in a .jsonl its key; one "
                        f"without '{defaults.TEXT_COLUMN}' may use '{defaults.JSONL_TEXT_KEY}')")
    p.add_argument("--chat", action="store_true",
                   help="질문/답변 행으로 챗봇 학습 / train a chatbot on question/answer rows (ChatbotData.csv: "
                        "Q,A,label), KoGPT2-chatbot layout")
    p.add_argument("--question_column", default=defaults.QUESTION_COLUMN,
                   help="--chat: 질문 열 / with --chat: the questions' column")
    p.add_argument("--answer_column", default=defaults.ANSWER_COLUMN,
                   help="--chat: 답변 열 / with --chat: the answers' column")
    p.add_argument("--dialogue_column", default=None,
                   help="--chat: 대화 id 열; 같은 값이 이어지는 행들이 한 대화(여러 턴을 한 문맥에서 학습) / with --chat: a "
                        "dialogue id column; consecutive rows with the same id are one dialogue, its turns learnt in one "
                        "context, so a chat's history helps (default: every row alone)")
    p.add_argument("--encoding", default=None,
                   help="CSV 인코딩 / CSV encoding (default: detect UTF-16 with BOM, UTF-8 with or without BOM, "
                        "CP949/EUC-KR)")
    p.add_argument("--format", default=defaults.DATA_FORMAT, choices=defaults.DATA_FORMATS,
                   help="데이터 파일 형식 (auto: 확장자로) / data file format (auto: by suffix; .txt: one text per line "
                        "or paragraph, read as a table if its first line has tabs as Excel's text exports; .jsonl: one "
                        "JSON object per line)")
    p.add_argument("--txt_unit", default=defaults.TXT_UNIT, choices=defaults.TXT_UNITS,
                   help=".txt의 텍스트 단위: 줄 또는 빈 줄 사이 문단 / a .txt's text: each line, or each paragraph between "
                        "blank lines (auto: paragraphs if blank lines separate blocks of several lines)")
    p.add_argument("--no_cache", action="store_true",
                   help="토큰 캐시를 읽지도 쓰지도 않음 / do not read or write the token cache (.NAME.kogpt2cache.npz "
                        "next to the CSV)")
    p.add_argument("--lr", type=number(above=0), default=None,
                   help=f"AdamW의 최고 학습률 / peak learning rate of AdamW (default: {defaults.FINETUNE_LR} as the "
                        f"original; "
                        f"{defaults.SCRATCH_LR} for --pretrained scratch)")
    p.add_argument("--warmup", type=integer(-1), default=defaults.WARMUP,
                   help="워밍업 스텝 수 (-1: 전체의 5%%) / warmup steps (-1: 5%% of the run)")
    p.add_argument("--max_len", type=integer(8), default=None,
                   help=f"학습 블록당 토큰 수 / tokens per training block (default: {defaults.MAX_LEN} or the "
                        f"model's context)")
    p.add_argument("--grad_accum", type=integer(1), default=defaults.GRAD_ACCUM,
                   help="옵티마이저 스텝당 배치 수 / batches per optimizer step")
    p.add_argument("--val_ratio", type=number(0, 0.9), default=defaults.VAL_RATIO,
                   help="검증용으로 떼어 둘 행의 비율 / share of rows held out for validation")
    p.add_argument("--val_file", default=None, help="--val_ratio 대신 쓸 검증 CSV / validation CSV instead of --val_ratio")
    p.add_argument("--eval_every", type=integer(0), default=defaults.EVAL_EVERY,
                   help="N 스텝마다 평가 (0: 에폭이 끝날 때마다) / evaluate every N steps (0: at each epoch end)")
    p.add_argument("--save_every", type=integer(1), default=defaults.SAVE_EVERY,
                   help="N 스텝마다 (그리고 에폭이 끝날 때) 체크포인트 저장 / write a checkpoint every N steps (and at "
                        "epoch ends)")
    p.add_argument("--keep_last", type=integer(0), default=defaults.KEEP_LAST,
                   help="디스크에 남길 정기 체크포인트 수 (0: 전부) / regular checkpoints kept on disk (0: all)")
    p.add_argument("--patience", type=integer(0), default=defaults.PATIENCE,
                   help="N번 평가하는 동안 검증 손실이 나아지지 않으면 멈춤 (0: 끔) / stop after N evaluations without a "
                        "better validation loss (0: off)")
    p.add_argument("--tensorboard", action="store_true",
                   help="SAVE_PATH/tensorboard에도 기록 (tensorboard 필요) / also log to SAVE_PATH/tensorboard (needs "
                        "tensorboard)")
    p.add_argument("--seed", type=integer(0), default=defaults.SEED,
                   help="난수 시드: 인자와 시드가 같으면 같은 학습 / random seed: same arguments and seed give the same run")
    p.add_argument("--device", type=device, default=defaults.DEVICE,
                   help="장치: auto (cuda, mps, cpu 순), cpu, cuda, cuda:1, mps / auto (cuda, mps, cpu), cpu, cuda, "
                        "cuda:1, mps")
    p.add_argument("--precision", default=defaults.PRECISION, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16을 지원하는 GPU는 bf16, 구형 GPU는 fp16, CPU는 fp32 / auto: bf16 autocast on GPUs that "
                        "have it, fp16 with a gradient scaler on older GPUs (T4, V100, P100), fp32 on the CPU")
    p.add_argument("--compile", default=defaults.COMPILE, choices=["auto", "on", "off"],
                   help="학습 스텝을 torch.compile (auto: CUDA에서 켬); 컴파일이 실패하면 없이 계속 학습 / torch.compile the "
                        "training step (auto: on for CUDA); if compiling fails, training goes on without it")
    p.add_argument("--dist_timeout", type=number(above=0), default=defaults.DIST_TIMEOUT_MINUTES,
                   help="torchrun에서 다른 프로세스를 기다리는 최대 분 (rank 0이 평가, 저장하는 동안) / torchrun: minutes a "
                        "process waits for the others (while rank 0 evaluates and saves)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU에서도 비트 단위로 같은 재개를 위해 결정적 커널만 사용 (조금 느림; CPU는 원래 정확) / "
                        "deterministic kernels, for bit-exact resumes on a GPU too (somewhat slower; the CPU is exact "
                        "anyway)")
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="역전파 때 활성값을 다시 계산: 메모리는 훨씬 적고 약 1/3 느리며 기울기는 같음 / recompute "
                        "activations in the backward pass: much less memory, about a third slower, the same gradients")
    p.add_argument("--lora", type=integer(1), default=None,
                   help="LoRA 랭크: 기본 가중치는 고정하고 작은 어댑터만 학습 (체크포인트 몇 MB, 메모리 적게, 스텝 빠르게) / "
                        "LoRA rank: freeze the base weights and train small adapters beside them (checkpoints of a few "
                        "MB, less memory, faster steps; default: off, every weight trains)")
    p.add_argument("--lora_alpha", type=number(above=0), default=defaults.LORA_ALPHA,
                   help="--lora: 어댑터의 크기 배율 (alpha / 랭크) / with --lora: the adapters' update is scaled by "
                        "alpha / rank")
    p.add_argument("--lora_dropout", type=number(0, 0.99), default=defaults.LORA_DROPOUT,
                   help="--lora: 어댑터 입력의 드롭아웃 / with --lora: dropout on the adapters' input")
    p.add_argument("--lora_layers", type=projections, default=defaults.LORA_TARGETS,
                   help="--lora: 어댑터를 붙일 블록 안의 층, 쉼표로 / with --lora: the projections in each block that get "
                        f"adapters, comma-separated, of {','.join(defaults.LORA_PROJECTIONS)} (default: all of them, "
                        "attention and MLP)")
    args = p.parse_args(argv)
    args.given = given_flags(p, argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from kogpt2.errors import report_errors

    def work() -> int:
        from kogpt2.finetune import run

        return run(args)

    return report_errors(work, interrupted_message="interrupted before training started; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
