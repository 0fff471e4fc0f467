"""python -m kogpt2.export: a Hugging Face folder that loads and generates like generator.py, and a small
generation-only file."""
import json
import os
import stat

import torch
from conftest import SAMPLE_CSV, TINY_TRAINING, payload_and_record, run_generator, run_main

from kogpt2.export import main as export_main
from kogpt2.store.checkpoint import load_checkpoint
from kogpt2.store.opening import model_from_checkpoint


def greedy_like_the_generator(folder, model, tokenizer, hf_model, hf_tokenizer):
    """Plain transformers use of the folder (no extra arguments) gives generator.py's greedy text: generate, and the
    text-generation pipeline (which decodes only the new tokens and appends them to the prompt)."""
    from transformers import pipeline

    from kogpt2.defaults import SamplingSettings
    from kogpt2.generation.engine import TextSampler

    sampler = TextSampler(model, tokenizer)
    generate = pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    for prompt in ("오늘 아침에는", "우리 동네", "그", "비 오는 날이면 옛날"):
        ours = sampler.complete(sampler.prompt_ids(prompt), SamplingSettings(temperature=0, text_size=20), seed=0)[0]
        inputs = hf_tokenizer(prompt, return_tensors="pt")
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=20)
        assert hf_tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True) == ours, prompt
        piped = generate(prompt, add_special_tokens=True, do_sample=False, max_new_tokens=20)
        assert piped[0]["generated_text"] == prompt + ours, prompt
    continuation_keeps_its_space(tokenizer, hf_tokenizer)


def continuation_keeps_its_space(tokenizer, hf_tokenizer):
    """New tokens decoded alone (a pipeline's return_full_text=False, a streamer) keep the space before their first
    word, and decode to our decoder's text; the ids are ours."""
    prompt, text = "오늘 아침에는", "오늘 아침에는 창문을 열었다."
    ids = tokenizer.encode(text)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
    new = ids[len(tokenizer.encode(prompt)):]
    assert hf_tokenizer.decode(new, skip_special_tokens=True) == " 창문을 열었다."
    assert prompt + hf_tokenizer.decode(new, skip_special_tokens=True) == tokenizer.decode(ids) == text


def trained_and_exported(release_folder, tmp_path):
    """One epoch from a release, exported: (our model, our tokenizer, transformers' model, transformers' tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert run_main("--epoch", 1, "--pretrained", release_folder, "--save_path", out, "--max_len", 32,
                    "--batch_size", 32, "--val_ratio", 0) == 0
    checkpoint = next(out.glob("KoGPT2_checkpoint_*.tar"))
    assert export_main([str(checkpoint), str(tmp_path / "hf")]) == 0
    model, tokenizer = model_from_checkpoint(*payload_and_record(checkpoint))
    return (model.eval(), tokenizer, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(),
            AutoTokenizer.from_pretrained(tmp_path / "hf"))


def same_logits(model, hf_model, tokenizer):
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("오늘 아침에는")])
    with torch.no_grad():
        return (hf_model(ids).logits - model(ids)).abs().max() <= 1e-4


def test_v2_export_loads_in_transformers_with_the_same_logits_and_ids(v2_release, tmp_path, capsys):
    folder, _ = v2_release("safetensors")
    model, tokenizer, hf_model, hf_tokenizer = trained_and_exported(folder, tmp_path)
    for text in ("우리 집은 우리 친구들에게 따뜻한 손길을 줄 수 있는 곳입니다.", "이모지 😀 와\n줄바꿈"):
        assert hf_tokenizer.encode(text) == [tokenizer.bos_id] + tokenizer.encode(text)  # the start token, as ours
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id and hf_tokenizer.pad_token_id == tokenizer.pad_id
    assert same_logits(model, hf_model, tokenizer)
    greedy_like_the_generator(tmp_path / "hf", model, tokenizer, hf_model, hf_tokenizer)
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["top_k"], config["top_p"], config["max_new_tokens"]) == (40, 0.9, 250)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "CC-BY-NC-SA 4.0" in card and "non-commercial" in card
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "hf").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_a_scratch_export_decodes_new_tokens_with_their_space(trained, tmp_path):
    from transformers import AutoTokenizer

    assert export_main([str(trained), str(tmp_path / "hf")]) == 0
    _, tokenizer = model_from_checkpoint(*payload_and_record(trained / "KoGPT2_best.tar"))
    continuation_keeps_its_space(tokenizer, AutoTokenizer.from_pretrained(tmp_path / "hf"))


def test_half_generation_file_is_small_and_generates(trained, tmp_path, capsys):
    target = tmp_path / "small.tar"
    assert export_main([str(trained / "KoGPT2_best.tar"), str(target), "--half"]) == 0
    full = (trained / "KoGPT2_best.tar").stat().st_size
    assert target.stat().st_size < full / 3  # no optimizer state, half-size weights (the tokenizer stays)
    assert load_checkpoint(target)["model_state_dict"]["transformer.wte.weight"].dtype == torch.bfloat16
    capsys.readouterr()
    assert run_generator("--load_path", target, "--tmp_sent", "오늘", "--seed", 1, "--text_size", 5) == 0
    assert capsys.readouterr().out.startswith("오늘")


def test_v1_export_keeps_every_id_and_the_exact_gelu(v1_release, tmp_path):
    import csv as csv_module

    folder, _ = v1_release
    model, tokenizer, hf_model, hf_tokenizer = trained_and_exported(folder, tmp_path)
    assert hf_model.config.activation_function == "gelu"
    with SAMPLE_CSV.open(encoding="utf-8") as f:
        texts = [row["sent"] for row in csv_module.DictReader(f)]
    texts += ["가나 😀😀 다\n\n라  마 ㅋㅋ ABC 123 龘", "  앞뒤 공백  ", "탭\t문자", "첫 줄 \n 둘째", "\n시작", "ＡＢＣ １２３",
              "<usr>오늘 뭐 해?<sys>집에서 쉬어요", "질문<usr>\n<sys> 답"]
    for text in texts:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
    assert hf_tokenizer.pad_token_id == tokenizer.pad_id == 3
    assert same_logits(model, hf_model, tokenizer)
    greedy_like_the_generator(tmp_path / "hf", model, tokenizer, hf_model, hf_tokenizer)
    assert "Modified MIT" in (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")


def test_resuming_from_a_generation_file_says_how_to_start_from_it(trained, tmp_path, capsys):
    small = tmp_path / "small.tar"
    assert export_main([str(trained), str(small), "--half"]) == 0  # a folder: its best checkpoint
    capsys.readouterr()
    assert run_main("--load_path", small, "--save_path", tmp_path / "run", *TINY_TRAINING) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {small} holds a model but no training state (a file written by kogpt2.export), so a run "
                   f"cannot resume from it; start a new run from its weights: --pretrained {small}")
    assert not (tmp_path / "run").exists()
    assert run_main("--epoch", 1, "--pretrained", small, "--save_path", tmp_path / "run", "--max_len", 64) == 0
    out = capsys.readouterr().out
    assert f"starting from the pretrained model {small}" in out
    first = load_checkpoint(next((tmp_path / "run").glob("KoGPT2_checkpoint_*.tar")))
    assert first["pretrained"] == str(small) and first["progress"]["step"] >= 1


def test_pretrained_takes_a_training_checkpoint_as_weights(trained, tmp_path, capsys):
    best = trained / "KoGPT2_best.tar"
    assert run_main("--epoch", 1, "--pretrained", best, "--save_path", tmp_path, "--max_len", 64) == 0
    out = capsys.readouterr().out
    assert f"starting from the pretrained model {best}" in out and "resuming" not in out
    assert load_checkpoint(next(tmp_path.glob("KoGPT2_checkpoint_*.tar")))["progress"]["epoch"] == 1
