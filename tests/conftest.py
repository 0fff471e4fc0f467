"""Shared test helpers: the real tokenizer fixtures (skipped where absent) and tiny models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
V1_SPIECE = FIXTURES / "kogpt2-v1" / "kogpt2_news_wiki_ko_cased_818bfa919d.spiece"
V2_TOKENIZER = FIXTURES / "kogpt2-v2" / "tokenizer.json"

torch.set_num_threads(2)


def pytest_configure(config):
    """The suite runs on the CPU even where a GPU is (its bit-exact checks assume the CPU's deterministic kernels);
    tests marked ``gpu`` run only when asked for (``pytest -m gpu``) on a machine with CUDA."""
    config.addinivalue_line("markers", "gpu: needs CUDA; run with pytest -m gpu (bench/gpu_check.py does)")
    if "gpu" not in (config.option.markexpr or "").replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any CUDA call, for this process and the ones it starts


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs CUDA (run pytest -m gpu on a GPU machine)"))


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real KoGPT2 tokenizer fixture {path} is absent (see shared/fixtures/README.md)")
    return path


@pytest.fixture(scope="session")
def v1_spiece() -> Path:
    return _need(V1_SPIECE)


@pytest.fixture(scope="session")
def v2_tokenizer_json() -> Path:
    return _need(V2_TOKENIZER)


@pytest.fixture(scope="session")
def expected_ids() -> dict:
    return json.loads(_need(FIXTURES / "expected_ids.json").read_text(encoding="utf-8"))


def tiny_hf_model(vocab_size: int, activation: str, n_embd: int = 128, seed: int = 0):
    """A small GPT2LMHeadModel with a real vocabulary size: the published architecture in miniature."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=n_embd, n_layer=2, n_head=n_embd // 64,
                        activation_function=activation, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def v2_release(tmp_path, v2_tokenizer_json):
    """A directory laid out like skt/kogpt2-base-v2 on the hub; weights as 'bin' or 'safetensors'."""
    import shutil

    def make(weights: str = "bin") -> tuple[Path, object]:
        folder = tmp_path / f"kogpt2-base-v2-{weights}"
        hf = tiny_hf_model(51200, "gelu_new")
        hf.save_pretrained(folder, safe_serialization=True)
        if weights == "bin":
            (folder / "model.safetensors").unlink()
            torch.save(hf.state_dict(), folder / "pytorch_model.bin")
        shutil.copy(v2_tokenizer_json, folder / "tokenizer.json")
        return folder, hf

    return make


@pytest.fixture
def v1_release(tmp_path, v1_spiece):
    """A directory like the 2020 cache ~/kogpt2/: torch.save(state_dict) of a v1-shaped GPT-2 and the real spiece."""
    import shutil

    folder = tmp_path / "kogpt2-v1"
    folder.mkdir()
    hf = tiny_hf_model(50000, "gelu")
    torch.save(hf.state_dict(), folder / "pytorch_kogpt2_testfixture.params")
    shutil.copy(v1_spiece, folder / v1_spiece.name)
    return folder, hf


SAMPLE_CSV = REPO / "data" / "sample.csv"
ROWS = ["오늘 아침에는 창문을 열었다.", "우리 동네 빵집은 새벽에 문을 연다.", "고양이는 햇볕이 드는 자리를 찾는다.",
        "비 오는 날이면 옛날 노래를 듣는다.", "동생은 라면에 계란을 두 개 넣는다."]


def write_csv(path: Path, rows: list[str], column: str = "sent") -> Path:
    path.write_text(f"score,genre,{column}\n" + "".join(f"1,x,{r}\n" for r in rows), encoding="utf-8")
    return path


def payload_and_record(path: Path) -> tuple[dict, object]:
    """A checkpoint's contents and its record, as ``model_from_checkpoint`` takes them."""
    from kogpt2.store.checkpoint import load_checkpoint, read_record

    payload = load_checkpoint(path)
    return payload, read_record(payload, path)


def run_main(*argv: str) -> int:
    """main.py in this process (no second torch import): returns its exit code."""
    import main

    return main.main([str(a) for a in argv])


def run_generator(*argv: str, stdin: str = "") -> int:
    import io
    import sys

    import generator

    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return generator.main([str(a) for a in argv])
    finally:
        sys.stdin = saved


TRAINED_EPOCHS = 30
TINY_TRAINING = ("--pretrained", "scratch:tiny", "--max_len", "64", "--batch_size", "8", "--seed", "1")


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained for a few epochs on data/sample.csv: the folder with its checkpoints and metrics."""
    folder = tmp_path_factory.mktemp("trained")
    assert run_main("--epoch", TRAINED_EPOCHS, "--data_file_path", SAMPLE_CSV, "--save_path", folder, *TINY_TRAINING) == 0
    return folder


DIALOGUE_CSV = REPO / "data" / "dialogue_sample.csv"


@pytest.fixture(scope="session")
def dialogue_chatbot(tmp_path_factory) -> Path:
    """A tiny chatbot trained on the three-turn dialogues of data/dialogue_sample.csv (--dialogue_column)."""
    folder = tmp_path_factory.mktemp("dialogue_chatbot")
    assert run_main("--chat", "--dialogue_column", "dialogue", "--data_file_path", DIALOGUE_CSV, "--epoch", 40,
                    "--save_path", folder, *TINY_TRAINING) == 0
    return folder


def ctrl_c_at_step(monkeypatch, step: int) -> None:
    """Training as usual, but a Ctrl-C (SIGINT) arrives during step ``step``: the run saves after it and stops."""
    import signal

    from kogpt2.train.trainer import Trainer

    original = Trainer._step

    def stepping(self, *args):
        if self.progress.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_step", stepping)


def slowed_main(step_delay: float, slow_saves: bool = False) -> str:
    """Code for ``python -c`` that runs main.py with every step (and optionally every checkpoint write) slowed,
    so a real process can be killed or interrupted in the middle of either."""
    slow_save = """
import io
save = torch.save
def slow_save(obj, file, *args, **kwargs):
    buffer = io.BytesIO()
    save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    for start in range(0, len(data), len(data) // 4 + 1):
        file.write(data[start:start + len(data) // 4 + 1])
        file.flush()
        time.sleep(0.03)
torch.save = slow_save
""" if slow_saves else ""
    return f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
import torch
import kogpt2.train.trainer as train
{slow_save}
step = train.Trainer._step
def slow_step(self, *args):
    time.sleep({step_delay})
    return step(self, *args)
train.Trainer._step = slow_step
import main
sys.exit(main.main(sys.argv[1:]))
"""
