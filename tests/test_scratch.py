"""--pretrained scratch: a tokenizer learnt from the CSV and a fresh GPT-2 that learns the data's style offline."""
import csv
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE_CSV

from kogpt2.defaults import SamplingSettings
from kogpt2.errors import KoGPT2Error
from kogpt2.generation.engine import TextSampler
from kogpt2.generation.prompt_loop import PromptLoop
from kogpt2.store.checkpoint import load_checkpoint, read_record
from kogpt2.store.opening import model_from_checkpoint
from kogpt2.store.scratch import scratch_size, train_tokenizer, vocab_size_for


def training_texts() -> list[str]:
    with SAMPLE_CSV.open(encoding="utf-8") as f:
        return [row["sent"] for row in csv.DictReader(f)]


def test_learnt_tokenizer_has_kogpt2_v1_special_tokens():
    tokenizer = train_tokenizer(training_texts())
    pieces = [tokenizer._sp.id_to_piece(i) for i in range(7)]
    assert pieces == ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<unused0>"]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (0, 1, 3, 5)
    poem = "봄바람이 불어오면\n나는 너를 생각한다"
    assert tokenizer.decode(tokenizer.encode(poem)) == poem
    assert tokenizer.vocab_size == vocab_size_for(training_texts()) == 1000


def test_vocab_size_grows_with_text_and_can_be_set():
    assert vocab_size_for(["가" * 100]) == 1000
    assert vocab_size_for(["가나다라" * 2_000_000]) == 22600
    assert train_tokenizer(training_texts(), vocab_size=600).vocab_size == 600


def test_unknown_size_is_named():
    assert scratch_size("scratch") == "tiny" and scratch_size("scratch:small") == "small"
    with pytest.raises(KoGPT2Error, match="unknown size 'huge'; choose one of tiny, small, medium, base"):
        scratch_size("scratch:huge")


def test_tiny_model_learns_the_sample(trained):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    payload = load_checkpoint(trained / "KoGPT2_best.tar")
    uniform = math.log(payload["config"]["vocab_size"])
    assert payload["progress"]["best_val_loss"] < 0.7 * uniform
    assert min(m["val_loss"] for m in metrics if "val_loss" in m) == payload["progress"]["best_val_loss"]

    model, tokenizer = model_from_checkpoint(payload, read_record(payload, "best"))
    corpus = "\n".join(training_texts())
    loop = PromptLoop(TextSampler(model.eval(), tokenizer), SamplingSettings(temperature=0, text_size=30), seed=0,
                      out=open("/dev/null", "w"))
    prompt = "저녁에 카페에서"
    continuation = loop.run(prompt)[0].text[len(prompt):].strip()
    assert len(continuation) >= 5 and continuation in corpus


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow  # a copy of the checkout, and the README's quickstart run there as real processes
def test_readme_quickstart_runs_offline_in_a_clean_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", "checkpoint", "quickstart", "__pycache__",
                                                                  ".pytest_cache"))
    (checkout / "checkpoint").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    commands = quickstart_commands()
    assert len(commands) == 2 and commands[0].startswith("python main.py") and commands[1].startswith("python generator.py")
    for command in commands:
        result = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=checkout,
                                env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("오늘 아침에는")
