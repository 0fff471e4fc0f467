"""Published KoGPT2 layouts load exactly; broken, hostile or absent ones end in one clear message."""
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from kogpt2 import KoGPT2Error, load_pretrained


def same_logits(model, hf, vocab_size):
    ids = torch.randint(0, vocab_size, (2, 9))
    with torch.no_grad():
        return (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_v2_directory_loads_like_the_hub_release(v2_release, weights):
    folder, hf = v2_release(weights)
    model, tokenizer = load_pretrained(str(folder))
    assert model.config.activation == "gelu_new" and model.config.vocab_size == 51200
    assert tokenizer.kind == "tokenizers" and tokenizer.encode("우리 집은") == [9351, 27321]
    assert same_logits(model, hf, 51200)


def test_v1_release_files_load_with_exact_gelu(v1_release):
    folder, hf = v1_release
    model, tokenizer = load_pretrained(str(folder))
    assert model.config.activation == "gelu"
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 2, 128)
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 50000
    assert same_logits(model, hf, 50000)


def test_release_checksum_in_the_name_is_checked(v1_release):
    folder, hf = v1_release
    (folder / "pytorch_kogpt2_testfixture.params").rename(folder / "pytorch_kogpt2_676e9bcfa7.params")
    with pytest.raises(KoGPT2Error, match=r"pytorch_kogpt2_676e9bcfa7\.params is corrupt"):
        load_pretrained(str(folder))


def test_v1_weights_with_v2_tokenizer_are_refused(v1_release, v2_tokenizer_json, tmp_path):
    import json
    import shutil

    folder, hf = v1_release
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    hf.config.to_json_file(mixed / "config.json")
    torch.save(hf.state_dict(), mixed / "pytorch_model.bin")
    shutil.copy(v2_tokenizer_json, mixed / "tokenizer.json")
    assert json.loads((mixed / "config.json").read_text())["vocab_size"] == 50000
    with pytest.raises(KoGPT2Error, match="vocabulary of 50000 tokens but the tokenizer has 51200"):
        load_pretrained(str(mixed))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = None


def test_hostile_pickle_is_refused_and_never_runs(v2_release, tmp_path):
    global PWNED
    folder, _ = v2_release("bin")
    PWNED = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(KoGPT2Error, match="refused: loading it would call posix.system"):
        load_pretrained(str(folder))
    assert not PWNED.exists()


def test_directory_without_a_release_says_what_is_needed(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(KoGPT2Error, match=r"expected config\.json .* found notes\.txt"):
        load_pretrained(str(tmp_path))


def test_offline_hub_id_fails_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_OFFLINE", None)
    code = "from kogpt2 import load_pretrained; load_pretrained('skt/kogpt2-base-v2')"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20
    assert result.returncode != 0
    assert "cannot get skt/kogpt2-base-v2" in result.stderr and "--pretrained FOLDER" in result.stderr
