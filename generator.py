"""Generate text from a fine-tuned checkpoint (or a pretrained model), interactively or in batch.

    python generator.py --load_path checkpoint/KoGPT2_checkpoint_100.tar --tmp_sent "내가 항상" --temperature 1.0
"""
import argparse
import sys

from kogpt2 import defaults
from kogpt2.arguments import Parser, device, given_flags, integer, number

SAMPLING = defaults.SAMPLING


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = Parser(description="KoGPT2 문장 생성 / generate text that starts with your phrase.")
    p.add_argument("--load_path", default=None,
                   help="생성에 쓸 체크포인트(.tar) 또는 폴더 (그 안의 KoGPT2_best.tar, 없으면 가장 최근 것); 없으면 "
                        "--pretrained / checkpoint (.tar) to generate from, or a folder (its KoGPT2_best.tar, else its "
                        "newest); without it, --pretrained")
    p.add_argument("--tmp_sent", default=None,
                   help="첫 문구; 다음 문구는 입력에서 읽음 / first phrase; later ones are read from the input")
    p.add_argument("--temperature", type=number(0), default=SAMPLING.temperature, 
                   help="0 = 가장 그럴듯한 토큰만(greedy); 높을수록 다양 / 0 = greedy; higher = more varied")
    p.add_argument("--top_k", type=integer(0), default=SAMPLING.top_k, 
                   help="가장 그럴듯한 토큰 k개 중에서 뽑기 (0 = 전부) / sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=number(above=0, maximum=1), default=SAMPLING.top_p,
                   help="확률 합이 이 값에 이르는 가장 작은 토큰 집합에서 뽑기, (0, 1] / nucleus: smallest set of tokens "
                        "reaching this probability, in (0, 1]")
    p.add_argument("--text_size", type=integer(1), default=SAMPLING.text_size, 
                   help="샘플당 최대 새 토큰 수 / most new tokens per sample")
    p.add_argument("--loops", type=integer(-1), default=defaults.LOOPS,
                   help="끝내기 전에 답할 프롬프트 수 (-1: 그만할 때까지) / prompts to answer before exiting (-1: until quit)")
    p.add_argument("--samples", default=None,
                   help="폴더: 결과마다 설정과 함께 파일로 저장 / folder: save each result as a file with its settings")
    p.add_argument("--repetition_penalty", type=number(above=0), default=SAMPLING.repetition_penalty,
                   help=">1이면 반복된 토큰이 덜 나옴 / >1 makes repeated tokens less likely")
    p.add_argument("--no_repeat_ngram", type=integer(0), default=SAMPLING.no_repeat_ngram,
                   help="이 크기의 n-gram 반복 금지 (0 = 끔) / forbid repeating any n-gram of this size (0 = off)")
    p.add_argument("--num_samples", type=integer(1), default=defaults.NUM_SAMPLES,
                   help="프롬프트당 샘플 수 (함께 생성) / samples per prompt (generated together)")
    p.add_argument("--seed", type=integer(0), default=None,
                   help="체크포인트, 프롬프트, 설정, 시드가 같으면 같은 텍스트 / same checkpoint, prompt, settings and seed "
                        "give the same text (default: a new one each time)")
    p.add_argument("--stop", action="append", help="추가 종료 문자열 (여러 번 가능) / extra stop string (repeatable)")
    p.add_argument("--pretrained", default=defaults.PRETRAINED,
                   help=f"--load_path가 없을 때 쓸 모델, 그리고 2020년 체크포인트의 v1 토크나이저 / model to sample when "
                        f"there is no --load_path, and the v1 tokenizer for 2020 checkpoints "
                        f"(default: {defaults.PRETRAINED})")
    p.add_argument("--device", type=device, default=defaults.DEVICE,
                   help="장치: auto (cuda, mps, cpu 순), cpu, cuda, cuda:N, mps / auto (cuda, mps, cpu), cpu, cuda, "
                        "cuda:N, mps")
    p.add_argument("--dtype", default=defaults.PRECISION, choices=["auto", "fp32", "bf16", "fp16"],
                   help="생성할 때 가중치의 정밀도 (auto: bf16을 지원하는 GPU는 bf16, 오래된 GPU는 fp16, CPU는 fp32; 같은 "
                        "시드라도 bf16과 fp32는 다른 텍스트) / weights' precision for generation (auto: bf16 on GPUs "
                        "that have it, fp16 on older GPUs, fp32 on the CPU; bf16 and fp32 give different text)")
    p.add_argument("--prompts", default=None,
                   help="일괄 모드: 텍스트 파일(한 줄에 프롬프트 하나) 또는 CSV, TSV, .jsonl (--column 참고) / batch "
                        "mode: a text file (one prompt a line) or a CSV, TSV or .jsonl (see --column)")
    p.add_argument("--column", default=defaults.TEXT_COLUMN,
                   help="--prompts의 CSV 열; 체크포인트에 없으면 --data_file_path의 열도 / CSV column of --prompts; also of "
                        "--data_file_path when the checkpoint names none")
    p.add_argument("--encoding", default=None,
                   help="--prompts의 인코딩 / encoding of --prompts (default: detect UTF-16 with BOM, UTF-8, "
                        "CP949/EUC-KR)")
    p.add_argument("--output", default=None,
                   help="일괄 모드: 샘플을 .csv(BOM 있는 UTF-8) 또는 .jsonl로 저장 / batch mode: write samples to .csv "
                        "(UTF-8 with BOM) or .jsonl")
    p.add_argument("--report", default=None,
                   help="JSON 보고서 작성: 복사율, 학습 텍스트와 겹치는 가장 긴 구간, distinct-1/2 / write a JSON report: "
                        "copy rate, longest run shared with the training text, distinct-1/2")
    p.add_argument("--no_copy", action="store_true",
                   help="학습 텍스트를 되풀이한 샘플은 다시 뽑기 / draw again any sample that repeats the training text")
    p.add_argument("--copy_words", type=integer(1), default=defaults.COPY_WORDS,
                   help="--no_copy: 샘플이 학습 행과 겹쳐도 되는 가장 긴 단어 수 / with --no_copy, the longest run of "
                        "words a sample may share with a training row")
    p.add_argument("--data_file_path", default=None,
                   help="--report/--no_copy에 쓸 학습 데이터 (CSV, .txt, .jsonl) / training data for --report/--no_copy "
                        "(default: the file the checkpoint was trained on)")
    p.add_argument("--format", default=None, choices=defaults.DATA_FORMATS,
                   help="--data_file_path의 형식 / format of --data_file_path (default: as the run read its own file, "
                        "else by suffix: .csv, .tsv, .txt, .jsonl)")
    p.add_argument("--txt_unit", default=None, choices=defaults.TXT_UNITS,
                   help="--data_file_path가 .txt일 때 텍스트 단위: 줄 또는 문단 / a .txt --data_file_path's text: each line "
                        "or each paragraph (default: as the run read its own file, else auto)")
    p.add_argument("--chat", action="store_true",
                   help="체크포인트가 --chat으로 학습되지 않았어도 대화 (지정하지 않은 샘플링 값은 대화 기본값) / chat (user "
                        "> question, streamed answer) even if the checkpoint was not trained with --chat; "
                        f"unset sampling flags then take chat defaults: temperature {defaults.CHAT_SAMPLING.temperature}, "
                        f"repetition_penalty {defaults.CHAT_SAMPLING.repetition_penalty}, text_size "
                        f"{defaults.CHAT_SAMPLING.text_size}")
    p.add_argument("--history", type=integer(0), default=None,
                   help="대화(CLI, 웹 페이지, API 모두): 문맥으로 남길 이전 턴 수 (0: 답마다 그 질문만 봄; 기본: 모델이 배운 만큼, "
                        "질문/답 쌍으로 배웠으면 0) / chat (CLI, web page and API alike): earlier turns kept as context (0: "
                        "each answer sees only its question; default: as many as the model learnt with, 0 for "
                        "question/answer pairs)")
    p.add_argument("--question_column", default=defaults.QUESTION_COLUMN,
                   help="대화: 질문이 든 --prompts의 CSV 열 / chat: CSV column of --prompts holding the questions")
    p.add_argument("--serve", action="store_true",
                   help="프롬프트 루프 대신 웹 페이지와 OpenAI 방식 HTTP API 제공 / serve a web page and an OpenAI-style "
                        "HTTP API instead of the prompt loop "
                        "(needs: pip install -r requirements-serve.txt)")
    p.add_argument("--host", default=defaults.HOST,
                   help="--serve: 접속을 받을 주소 (0.0.0.0은 네트워크에 공개) / with --serve: the address to listen on "
                        "(0.0.0.0 opens it to your network)")
    p.add_argument("--port", type=integer(1), default=defaults.PORT, help="--serve: 포트 / with --serve: the port")
    args = p.parse_args(argv)
    args.given = given_flags(p, argv)
    if args.output and not args.prompts:
        p.error("--output needs --prompts")
    if args.output and not args.output.lower().endswith((".csv", ".jsonl")):
        p.error(f"--output {args.output}: write to a .csv (opens in Excel) or a .jsonl file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from kogpt2.errors import report_errors

    def work() -> int:
        from kogpt2.generator import run

        return run(args)

    return report_errors(work, interrupted=0)  # Ctrl-C simply ends the session


if __name__ == "__main__":
    sys.exit(main())
