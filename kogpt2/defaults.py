"""Every default in one torch-free place: the CLIs, the sampling engine, training and the exporter read them here,
so a ``--help`` text, an exported ``generation_config.json`` and a training sample can never disagree."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .errors import KoGPT2Error

PRETRAINED = "skt/kogpt2-base-v2"
TEXT_COLUMN = "sent"
QUESTION_COLUMN = "Q"  # ChatbotData.csv's columns
ANSWER_COLUMN = "A"
JSONL_TEXT_KEY = "text"  # a .jsonl's text key when --column is left at TEXT_COLUMN
DATA_FORMATS = ("auto", "csv", "tsv", "txt", "jsonl")  # auto: by the file's suffix (.csv, .tsv, .txt, .jsonl)
DATA_FORMAT = "auto"
TXT_UNITS = ("auto", "line", "paragraph")
TXT_UNIT = "auto"  # paragraphs if blank lines separate blocks of several lines (see below), else lines
TXT_PARAGRAPH_LINES = 10  # auto: longer blocks on average are lines with stray blank lines between, not paragraphs
SAVE_PATH = "checkpoint/"
DATA_FILE = "data/sample.csv"

EPOCHS = 5
BATCH_SIZE = 4
MAX_LEN = 256  # tokens per training block, or the model's context if shorter
FINETUNE_LR = 3e-5  # the original's
SCRATCH_LR = 1e-3  # a fresh small model learns nothing at a fine-tuning rate
DIST_TIMEOUT_MINUTES = 10.0  # torchrun: what NCCL itself waits by default
WARMUP = -1  # optimizer steps; -1: 5% of the run
GRAD_ACCUM = 1
WEIGHT_DECAY = 0.01
CLIP = 1.0  # gradient norm
VAL_RATIO = 0.1
EVAL_EVERY = 0  # optimizer steps; 0: at each epoch end
SAVE_EVERY = 500
KEEP_LAST = 3
METRICS_FLUSH_SECONDS = 10.0  # metrics.jsonl is appended to at least this often, and before every checkpoint
PATIENCE = 0  # evaluations without a better validation loss; 0: never stop early
SEED = 42
DEVICE = "auto"  # cuda, mps, else cpu
PRECISION = "auto"  # training: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU; generation alike
COMPILE = "auto"  # on for CUDA
EVAL_SPLIT = "all"
COPY_WORDS = 8  # --no_copy: the longest run of words a sample may share with a training row
HOST = "127.0.0.1"  # --serve: this computer only
PORT = 8000
MAX_BATCH = None  # --serve: samples decoded together; None: fitted to the device (generation/batching.py)
MAX_QUEUE = 32  # --serve: requests waiting for a place in the batch; past it, 503 at once
API_KEY_ENV = "KOGPT2_API_KEY"  # --serve: where the key is read when --api_key is not given
MAX_BODY_BYTES = 4 * 2**20  # --serve: a larger request body gets 413
OPENAI_PENALTY = 2.0  # presence and frequency penalties lie in [-this, this]

# --lora: adapters beside the attention and MLP projections of every block (the Hugging Face GPT-2 names, which PEFT's
# target_modules match), scaled by alpha / rank; they learn at a higher rate than full fine-tuning's.
LORA_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_TARGETS = LORA_PROJECTIONS
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.0  # PEFT's default; on the CPU a dropout mask per adapter costs more than the adapter
LORA_LR = 2e-4


@dataclass(frozen=True)
class SamplingSettings:
    """How the next tokens are drawn. The defaults are ``generator.py``'s and the exported model's."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 40  # 0: all tokens
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's, in [-OPENAI_PENALTY, OPENAI_PENALTY]
    frequency_penalty: float = 0.0
    no_repeat_ngram: int = 0
    text_size: int = 250  # most new tokens
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise KoGPT2Error(f"temperature must be 0 (greedy) or a positive number, not {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise KoGPT2Error(f"top_p must be in (0, 1], not {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise KoGPT2Error(f"repetition_penalty must be a positive number, not {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -OPENAI_PENALTY <= getattr(self, name) <= OPENAI_PENALTY:
                raise KoGPT2Error(f"{name} must be in [-{OPENAI_PENALTY:g}, {OPENAI_PENALTY:g}], not "
                                  f"{getattr(self, name)}")
        if self.top_k < 0:
            raise KoGPT2Error(f"top_k must be 0 (all tokens) or more, not {self.top_k}")
        if self.no_repeat_ngram < 0:
            raise KoGPT2Error(f"no_repeat_ngram must be 0 (off) or more, not {self.no_repeat_ngram}")
        if self.text_size < 1:
            raise KoGPT2Error(f"text_size must be at least 1, not {self.text_size}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["stop"] = list(self.stop)
        return values

    def with_value(self, name: str, value) -> "SamplingSettings":
        return replace(self, **{name: value})

    def updated(self, values: dict) -> "SamplingSettings":
        """These settings with ``values`` over them (None keeps a setting; one stop string may stand alone)."""
        given = {k: v for k, v in values.items() if v is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        return replace(self, **{k: tuple(v) if k == "stop" else v for k, v in given.items()})


SAMPLING = SamplingSettings()
NUM_SAMPLES = 1
LOOPS = -1  # prompts to answer before exiting; -1: until quit
# Chat answers: short, varied, and without the loops a plain sampler falls into on a small chat corpus.
CHAT_SAMPLING = SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, text_size=64)

# The short text printed at each evaluation while training: a fixed phrase, drawn with the run's seed.
TRAINING_SAMPLE_PHRASE = "우리"
TRAINING_SAMPLE_QUESTION = "오늘 뭐 하고 놀까?"  # chat runs answer this instead
TRAINING_SAMPLE = SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, text_size=40)

# The HTTP API's bounds on one request.
MAX_TOKENS = 2048
MAX_SAMPLES = 16
MAX_LOGPROBS = 5  # OpenAI's
MAX_PROMPT_CHARS = 100_000
MAX_STOP_STRINGS = 16
MAX_REPETITION_PENALTY = 100.0  # and its inverse the least: past these, logits overflow
