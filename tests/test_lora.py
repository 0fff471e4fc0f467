"""main.py --lora: adapters trained beside a frozen base, small checkpoints that resume exactly and refuse another
base, that every command opens merged like any other model, and that export for transformers and PEFT."""
import json
import shutil

import pytest
import torch
from conftest import DIALOGUE_CSV, SAMPLE_CSV, ctrl_c_at_step, run_generator, run_main
from test_distributed import metrics, torchrun
from test_export import greedy_like_the_generator
from test_gpu_paths import newest_path as newest
from test_train import assert_same_tensors, final_state

from kogpt2.defaults import LORA_PROJECTIONS, SamplingSettings
from kogpt2.model.gpt import GPT, GPTConfig
from kogpt2.model.lora import LoraSettings, add_adapters, adapted_layers, merge_adapters
from kogpt2.store.checkpoint import load_checkpoint
from kogpt2.store.opening import open_model

LORA = ("--data_file_path", SAMPLE_CSV, "--max_len", 64, "--batch_size", 8, "--seed", 1, "--lora", 4)


@pytest.fixture(scope="module")
def base(tmp_path_factory, trained):
    """A trained tiny model as a .tar: the frozen base of the runs here."""
    path = tmp_path_factory.mktemp("base") / "base.tar"
    shutil.copy(trained / "KoGPT2_best.tar", path)
    return path


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, base):
    """Three epochs of rank-4 adapters on ``base``, at a rate high enough for them to change its text."""
    folder = tmp_path_factory.mktemp("adapted")
    assert run_main("--epoch", 3, "--pretrained", base, "--save_path", folder, *LORA, "--lr", 3e-3) == 0
    return folder


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4))


def test_adapters_start_as_the_base_and_merge_into_the_same_outputs():
    model = tiny_gpt().eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        plain = model(ids)
        add_adapters(model, LoraSettings(4, 8.0, 0.0, LORA_PROJECTIONS))
        assert torch.equal(model(ids), plain)  # B starts at zero
        for layer in adapted_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.2)
        adapted = model(ids)
        merge_adapters(model)
        merged = model(ids)
    assert (adapted - plain).abs().max() > 0.1
    assert (merged - adapted).abs().max() < 1e-5
    assert adapted_layers(model) == {}  # decoding runs plain projections: no extra matmuls per token
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_gpt().parameters())


def test_a_frozen_tied_head_gets_no_gradient_and_the_adapters_the_plain_ones():
    """The CPU's chunked head loss and tied-gradient buffer leave the frozen embedding alone (no [vocab, C] gradient
    made, kept or left for the optimizer to miss), and give the adapters plain autograd's gradients."""
    model = tiny_gpt().train()
    add_adapters(model, LoraSettings(4, 8.0, 0.1, LORA_PROJECTIONS))
    for layer in adapted_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    model.tied_grad.in_place = True  # as the trainer sets it for one process
    ids = torch.randint(0, 300, (2, 20))
    grads = []
    for plain in (False, True):  # the CPU's paths, and the plain autograd of a compiled step
        model.plain_autograd = plain
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        model(ids, targets=ids).backward()
        assert model.transformer.wte.weight.grad is None and model.tied_grad.kept is None
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        grads.append([p.grad for n, p in model.named_parameters() if "lora_" in n])
    assert all(g.abs().sum() > 0 and torch.allclose(g, h, atol=1e-6, rtol=1e-4) for g, h in zip(*grads))


def test_only_the_adapters_train_and_the_checkpoint_holds_no_base_weight(adapted, base):
    path = newest(adapted)
    payload = load_checkpoint(path)
    names = {f"transformer.h.{i}.{t}.{part}" for i in range(2) for t in LORA_PROJECTIONS for part in ("lora_A", "lora_B")}
    assert "model_state_dict" not in payload and set(payload["adapters"]) == names
    assert payload["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": list(LORA_PROJECTIONS)}
    assert payload["base"]["kind"] == "file" and payload["base"]["source"] == str(base.resolve())
    moments = payload["optimizer_state_dict"]["state"].values()  # Adam's moments for the adapters alone
    assert sum(m["exp_avg"].numel() for m in moments) == sum(t.numel() for t in payload["adapters"].values())
    assert path.stat().st_size < base.stat().st_size / 4
    before, after = open_model(None, str(base)).model, open_model(path).model
    projections = {f"{name}.weight" for name in (n.rsplit(".", 1)[0] for n in names)}
    for name, weight in after.named_parameters():
        changed = not torch.equal(weight, before.get_parameter(name))
        assert changed == (name in projections), name  # the update merged into the projections, the rest frozen


def test_an_interrupted_lora_run_resumed_equals_one_run(tmp_path, base, monkeypatch, capsys):
    """Stopped by Ctrl-C and resumed with no --lora flag: the same adapters, moments and progress, tensor for
    tensor (the adapters' dropout draws from the saved random state)."""
    args = ("--epoch", 2, "--pretrained", base, *LORA, "--lora_dropout", 0.1)
    assert run_main(*args, "--save_path", tmp_path / "straight") == 0
    ctrl_c_at_step(monkeypatch, 13)
    assert run_main(*args, "--save_path", tmp_path / "cut") == 0
    monkeypatch.undo()
    assert final_state(tmp_path / "cut")["progress"]["step"] == 14
    capsys.readouterr()
    assert run_main("--epoch", 2, "--data_file_path", SAMPLE_CSV, "--save_path", tmp_path / "cut",
                    "--load_path", tmp_path / "cut") == 0
    assert "--lora 4" in capsys.readouterr().out  # taken from the checkpoint
    want, got = final_state(tmp_path / "straight"), final_state(tmp_path / "cut")
    for key in ("adapters", "optimizer_state_dict", "progress", "lora", "base"):
        assert_same_tensors(want[key], got[key])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_lora_runs_resume_exactly(tmp_path, base, precision):
    args = ("--epoch", 2, "--pretrained", base, *LORA, "--precision", precision, "--save_every", 7, "--keep_last", 0)
    assert run_main(*args, "--save_path", tmp_path / "straight") == 0
    (tmp_path / "stopped").mkdir()  # as if killed after the step-7 checkpoint
    shutil.copy(tmp_path / "straight" / "KoGPT2_checkpoint_7.tar", tmp_path / "stopped")
    assert run_main(*args, "--save_path", tmp_path / "stopped", "--load_path", tmp_path / "stopped") == 0
    want, got = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    for key in ("adapters", "optimizer_state_dict", "progress") + (("scaler",) if precision == "fp16" else ()):
        assert_same_tensors(want[key], got[key])
    assert want["progress"]["loss"] < metrics(tmp_path / "straight")[0]["train_loss"]


def test_grad_checkpoint_gives_a_lora_run_the_same_losses(tmp_path, base):
    losses = []
    for name, extra in (("plain", ()), ("recompute", ("--grad_checkpoint",))):
        assert run_main("--epoch", 1, "--pretrained", base, *LORA, "--save_path", tmp_path / name, *extra) == 0
        losses.append([m["train_loss"] for m in metrics(tmp_path / name)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_a_compiled_lora_run_matches_eager(tmp_path, base, capsys):
    losses = []
    for name in ("off", "on"):  # no dropout: compiled code draws its masks with another generator
        assert run_main("--epoch", 1, "--pretrained", base, *LORA, "--save_path", tmp_path / name, "--compile", name,
                        "--dropout", 0, "--lora_dropout", 0) == 0
        losses.append([m["train_loss"] for m in metrics(tmp_path / name)])
    out = capsys.readouterr().out
    assert ", compiled;" in out and "torch.compile failed" not in out
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def greedy_texts(model, tokenizer) -> list[str]:
    from kogpt2.generation.engine import TextSampler

    sampler = TextSampler(model.eval(), tokenizer)
    return [sampler.complete(sampler.prompt_ids(p), SamplingSettings(temperature=0, text_size=12), seed=0)[0]
            for p in ("오늘", "우리")]


def test_every_command_opens_an_adapter_checkpoint_merged(adapted, base, tmp_path, capsys):
    """generator.py (its text is the merged model's, not the base's), kogpt2.evaluate (the run's own validation
    loss), and --report."""
    from kogpt2.evaluate import main as evaluate_main

    opened = open_model(adapted)
    greedy = greedy_texts(opened.model, opened.tokenizer)
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert run_generator("--load_path", adapted, "--tmp_sent", "오늘", "--temperature", 0, "--text_size", 12,
                         "--loops", 1, "--report", report) == 0
    assert capsys.readouterr().out.startswith("오늘" + greedy[0])
    written = json.loads(report.read_text(encoding="utf-8"))  # measured against the run's own training rows
    assert written["samples"][0]["text"] == "오늘" + greedy[0] and written["summary"]["samples"] == 1
    assert greedy != greedy_texts(open_model(None, str(base)).model, opened.tokenizer)
    assert evaluate_main(["--load_path", str(adapted), "--split", "val"]) == 0
    loss = float(capsys.readouterr().out.split("(loss ")[1].split(")")[0])
    best = min(m["val_loss"] for m in metrics(adapted) if "val_loss" in m)
    assert loss == pytest.approx(best, abs=1e-6)


def test_the_server_answers_from_an_adapter_checkpoint_like_the_cli(adapted, capsys):
    pytest.importorskip("fastapi", reason="the server's packages are absent")
    from test_server import Server

    server = Server(adapted)
    try:
        status, answer = server.post("/v1/completions", {"prompt": "오늘", "max_tokens": 8, "temperature": 0})
    finally:
        server.stop()
    capsys.readouterr()
    assert run_generator("--load_path", adapted, "--tmp_sent", "오늘", "--temperature", 0, "--text_size", 8,
                         "--loops", 1) == 0
    assert status == 200 and capsys.readouterr().out.startswith("오늘" + answer["choices"][0]["text"])


def test_adapters_refuse_a_base_that_changed_or_is_gone(tmp_path, trained, capsys):
    base = tmp_path / "base.tar"
    shutil.copy(trained / "KoGPT2_best.tar", base)
    assert run_main("--epoch", 1, "--pretrained", base, "--save_path", tmp_path / "run", *LORA) == 0
    best_step = load_checkpoint(base)["progress"]["step"]
    other = next(p for p in sorted(trained.glob("KoGPT2_checkpoint_*.tar"))
                 if load_checkpoint(p)["progress"]["step"] != best_step)
    shutil.copy(other, base)  # another model where the base was
    capsys.readouterr()
    assert run_generator("--load_path", tmp_path / "run", "--tmp_sent", "오늘", "--loops", 1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds LoRA adapters for another base model than the one now at {base.resolve()}" in err
    base.unlink()
    assert run_main("--epoch", 2, "--data_file_path", SAMPLE_CSV, "--save_path", tmp_path / "run",
                    "--load_path", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"whose base model {base.resolve()} is gone (moved or deleted)" in err


def test_lora_flags_that_cannot_work_are_one_line(tmp_path, capsys):
    assert run_main("--epoch", 1, *LORA, "--save_path", tmp_path, "--pretrained", "scratch:tiny") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lora trains adapters beside a pretrained model's frozen weights" in err
    with pytest.raises(SystemExit) as exit_:
        run_main(*LORA, "--lora_layers", "attn.c_attn,mlp.up")
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        "error: argument --lora_layers: 'attn.c_attn,mlp.up': give some of attn.c_attn,attn.c_proj,mlp.c_fc,"
        "mlp.c_proj, comma-separated\n")


def test_a_resume_keeps_its_adapters_or_their_absence(adapted, trained, tmp_path, capsys):
    assert run_main("--epoch", 9, *LORA[:-1], 8, "--save_path", tmp_path / "a", "--load_path", newest(adapted)) == 2
    assert "has adapters of rank 4, and a resume keeps them" in capsys.readouterr().err
    assert run_main("--epoch", 99, *LORA, "--save_path", tmp_path / "b", "--load_path", newest(trained)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no adapters (every weight trains), and a resume keeps them" in err


def test_a_chat_run_with_adapters_opens_a_chat(tmp_path, dialogue_chatbot, capsys):
    best = dialogue_chatbot / "KoGPT2_best.tar"
    assert run_main("--chat", "--dialogue_column", "dialogue", "--data_file_path", DIALOGUE_CSV, "--epoch", 2,
                    "--pretrained", best, "--max_len", 64, "--batch_size", 8, "--lora", 2,
                    "--save_path", tmp_path) == 0
    payload = load_checkpoint(newest(tmp_path))
    assert payload["mode"] == "chat" and payload["lora"]["rank"] == 2
    capsys.readouterr()
    assert run_generator("--load_path", tmp_path, "--seed", 1, stdin="안녕\n/reset\n") == 0
    answer, said = capsys.readouterr().out.splitlines()  # a chat: an answer (not the prompt continued), /reset
    assert not answer.startswith("안녕") and said.startswith("history cleared")


def test_exports_of_an_adapter_checkpoint_generate_like_the_generator(v2_release, tmp_path, capsys):
    """A merged Hugging Face folder, and the PEFT folder that PeftModel loads onto the base folder: both give
    generator.py's greedy text, which the adapters changed."""
    peft = pytest.importorskip("peft", reason="peft is a test-only package: pip install -r requirements-test.txt")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kogpt2.export import main as export_main
    from kogpt2.generation.engine import TextSampler

    folder, _ = v2_release("safetensors")
    run = tmp_path / "run"
    assert run_main("--epoch", 1, "--pretrained", folder, "--save_path", run, "--max_len", 32, "--batch_size", 16,
                    "--val_ratio", 0, "--lora", 4, "--lr", 2e-2) == 0
    assert export_main([str(run), str(tmp_path / "merged")]) == 0
    assert export_main([str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    opened = open_model(newest(run))
    model, tokenizer = opened.model.eval(), opened.tokenizer
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    greedy_like_the_generator(tmp_path / "merged", model, tokenizer, merged, AutoTokenizer.from_pretrained(tmp_path / "merged"))

    with_adapters = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    sampler, settings, changed = TextSampler(model, tokenizer), SamplingSettings(temperature=0, text_size=16), False
    for prompt in ("오늘 아침에는", "우리 동네", "그"):
        ids = sampler.prompt_ids(prompt)
        ours = sampler.complete(ids, settings, seed=0)[0]
        inputs = torch.tensor([ids])
        with torch.no_grad():
            out = with_adapters.generate(input_ids=inputs, do_sample=False, max_new_tokens=16)
            base_out = plain.generate(input_ids=inputs, do_sample=False, max_new_tokens=16)
            assert (with_adapters(input_ids=inputs).logits - model(inputs)).abs().max() < 1e-4
        assert tokenizer.decode(out[0, len(ids):].tolist()) == ours, prompt
        changed |= not torch.equal(out, base_out)
    assert changed


def test_exporting_adapters_of_a_whole_model_is_one_line(trained, tmp_path, capsys):
    from kogpt2.export import main as export_main

    assert export_main([str(trained), str(tmp_path / "adapter"), "--adapter"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a whole model, not LoRA adapters (trained with --lora)" in err


@pytest.mark.slow
def test_lora_under_torchrun_equals_one_process_with_the_whole_batch(tmp_path, base):
    args = ("--epoch", 2, "--pretrained", base, *LORA[:-4], "--dropout", 0, "--lora_dropout", 0, "--lora", 4,
            "--grad_accum", 2, "--keep_last", 0)
    process = torchrun(*args, "--batch_size", 2, "--save_path", tmp_path / "two")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert run_main(*args, "--batch_size", 4, "--save_path", tmp_path / "one") == 0
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) >= 10
    assert all(abs(a["train_loss"] - b["train_loss"]) <= 1e-5 for a, b in zip(one, two))
    want, got = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert "model_state_dict" not in got
    for name, tensor in want["adapters"].items():
        assert (tensor - got["adapters"][name]).abs().max() <= 1e-5, name
