"""The GPU user's options, proven on the CPU: fp16 with a gradient scaler (exact resume), gradient checkpointing
(the same gradients), torch.compile (and its fallback), out-of-memory advice, and precision auto."""
import json

import pytest
import torch
from conftest import SAMPLE_CSV, run_main

from kogpt2.store.checkpoint import load_checkpoint

# TINY_TRAINING without its batch size, which these runs set themselves
TINY = ("--data_file_path", SAMPLE_CSV, "--pretrained", "scratch:tiny", "--max_len", 64, "--seed", 1, "--save_every", 7,
        "--keep_last", 0)


def newest(folder):
    return load_checkpoint(newest_path(folder))


def newest_path(folder):
    return max(folder.glob("KoGPT2_checkpoint_*.tar"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def test_fp16_with_a_scaler_resumes_bit_identically(tmp_path, capsys):
    import shutil

    args = ("--epoch", 2, *TINY, "--precision", "fp16", "--batch_size", 8)
    assert run_main(*args, "--save_path", tmp_path / "straight") == 0
    (tmp_path / "stopped").mkdir()  # as if the run had been killed after its step-7 checkpoint
    shutil.copy(tmp_path / "straight" / "KoGPT2_checkpoint_7.tar", tmp_path / "stopped")
    assert run_main(*args, "--save_path", tmp_path / "stopped", "--load_path", tmp_path / "stopped") == 0
    want, got = newest(tmp_path / "straight"), newest(tmp_path / "stopped")
    assert "scaler" in want and want["scaler"]["scale"] > 0 and want["settings"]["precision"] == "fp16"
    for key in ("model_state_dict", "optimizer_state_dict", "scaler", "progress"):
        assert same_tensors(want[key], got[key]), key
    assert ", fp16;" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_gradients():
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=3, n_head=4, dropout=0.1)).train()
    ids, targets = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    grads = []
    for recompute in (False, True):
        model.grad_checkpoint = recompute
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout masks
        model(ids, targets=targets).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads))


def test_grad_checkpoint_trains_like_the_plain_run(tmp_path):
    losses = []
    for name, extra in (("plain", ()), ("recompute", ("--grad_checkpoint",))):
        assert run_main("--epoch", 1, *TINY, "--batch_size", 8, "--save_path", tmp_path / name, *extra) == 0
        losses.append([json.loads(line)["train_loss"] for line in (tmp_path / name / "metrics.jsonl").open()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_out_of_memory_names_the_batch_and_what_to_try(tmp_path, capsys, monkeypatch):
    import kogpt2.train.trainer

    assert run_main("--epoch", 1, *TINY, "--batch_size", 8, "--save_path", tmp_path) == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(kogpt2.train.trainer, "batch_loss_sum", out_of_memory)
    capsys.readouterr()
    assert run_main("--epoch", 2, *TINY, "--batch_size", 8, "--save_path", tmp_path, "--load_path", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: out of GPU memory with --batch_size 8 x --max_len 64; try --batch_size 4 "
                           "--grad_accum 2") and "--grad_checkpoint" in last
    assert last.endswith(f"the last checkpoint ({newest_path(tmp_path)}) is untouched")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == before


def test_a_failed_compile_falls_back_to_eager_with_one_line(tmp_path, capsys, monkeypatch):
    from torch._inductor.exc import InductorError

    import kogpt2.train.trainer

    def broken_compile(module, dynamic):
        def forward(*args, **kwargs):
            raise InductorError(RuntimeError("no C++ compiler\nmore detail"), None)
        return forward

    monkeypatch.setattr(kogpt2.train.trainer.torch, "compile", broken_compile)
    assert run_main("--epoch", 1, *TINY, "--batch_size", 8, "--save_path", tmp_path, "--compile", "on") == 0
    out = capsys.readouterr().out
    assert out.count("note: torch.compile failed (InductorError: RuntimeError: no C++ compiler); "
                     "training goes on without it") == 1


def test_a_device_error_in_the_first_compiled_step_is_not_taken_for_a_compiler_failure(tmp_path, capsys, monkeypatch):
    """A failed device assert leaves the CUDA context broken: retrying eagerly would only fail again, later."""
    import kogpt2.train.trainer

    def asserting_compile(module, dynamic):
        def forward(*args, **kwargs):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return forward

    monkeypatch.setattr(kogpt2.train.trainer.torch, "compile", asserting_compile)
    with pytest.raises(RuntimeError, match="device-side assert"):
        run_main("--epoch", 1, *TINY, "--batch_size", 8, "--save_path", tmp_path, "--compile", "on")
    assert "torch.compile failed" not in capsys.readouterr().out


def test_every_compiled_step_has_the_same_shapes_and_the_losses_of_eager(tmp_path, monkeypatch, capsys):
    """A short last batch is padded with ignored rows, so the compiled step never recompiles for it; the losses are
    those of the unpadded batches."""
    import kogpt2.train.trainer

    shapes, losses = [], []
    batch_loss_sum = kogpt2.train.trainer.batch_loss_sum

    def recording(model, batch, device, precision):
        shapes.append(tuple(batch.inputs.shape))
        return batch_loss_sum(model, batch, device, precision)

    monkeypatch.setattr(kogpt2.train.trainer, "batch_loss_sum", recording)
    monkeypatch.setattr(kogpt2.train.trainer.torch, "compile", lambda module, dynamic: module)  # the shapes, not the compiler
    for name in ("off", "on"):
        shapes.clear()
        assert run_main("--epoch", 1, *TINY, "--batch_size", 7, "--save_path", tmp_path / name, "--compile", name,
                        "--dropout", 0) == 0
        losses.append([json.loads(line)["train_loss"] for line in (tmp_path / name / "metrics.jsonl").open()])
        if name == "off":
            assert len(set(shapes)) == 2  # the data end in a short batch
    assert set(shapes) == {(7, 64)}
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("mode", ["text", "chat", "grad_checkpoint"])
def test_the_compiled_training_step_is_one_graph(mode):
    """What CUDA runs compiled: one graph, no breaks (a break splits the step and costs a recompile per piece)."""
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4)).train()
    model.plain_autograd, model.grad_checkpoint = True, mode == "grad_checkpoint"
    ids = torch.randint(0, 300, (4, 32))
    segments = torch.arange(32).div(10, rounding_mode="floor").expand(4, 32) if mode == "chat" else None
    explained = torch._dynamo.explain(model)(ids, targets=ids, segments=segments)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("frozen_head", [False, True])
def test_the_compiled_forward_and_backward_is_one_graph_with_eagers_loss_and_gradients(frozen_head):
    """The head's loss as CUDA compiles it (chunks, the vocabulary padded to 128) traces whole, backward included,
    and gives what the CPU's eager path gives; frozen: a LoRA run's head."""
    from kogpt2.model.gpt import GPT, GPTConfig
    from kogpt2.model.head_loss import IGNORE_INDEX

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0)).train()
    model.transformer.wte.weight.requires_grad_(not frozen_head)
    ids, targets = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    targets[:, :5] = IGNORE_INDEX
    runs = []
    for compiled in (False, True):
        model.plain_autograd, model.vocab_multiple = compiled, 128 if compiled else 1
        forward = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else model
        model.zero_grad(set_to_none=True)
        loss = forward(ids, targets=targets)  # fullgraph: a graph break would raise
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = runs
    assert torch.allclose(got, want, rtol=1e-5)
    assert (model.transformer.wte.weight.grad is None) == frozen_head
    assert all((g is None and w is None) or torch.allclose(g, w, atol=1e-6, rtol=1e-4)
               for g, w in zip(got_grads, want_grads, strict=True))


def test_a_global_batch_smaller_than_the_world_gives_every_rank_rows():
    """Flash attention rejects a batch of 0 rows: a rank whose share is empty gets an ignored row instead."""
    from kogpt2.corpus.packing import PackedData
    from kogpt2.train.trainer import shard

    blocks = torch.randint(10, 300, (3, 9))
    data = PackedData(blocks, torch.full((3,), 8), 3, 0, 24)
    alone = data.batch(torch.tensor([2]))
    parts = [shard(data, torch.tensor([2]), 4, 4, rank) for rank in range(4)]
    assert [len(part.inputs) for part in parts] == [1, 1, 1, 1]
    assert torch.equal(parts[0].targets, alone.targets)
    assert all((part.targets == -100).all() for part in parts[1:])


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    losses = []
    for name in ("off", "on"):
        # no dropout: compiled code draws its random masks with another generator
        assert run_main("--epoch", 1, *TINY, "--batch_size", 8, "--save_path", tmp_path / name, "--compile", name,
                        "--dropout", 0) == 0
        losses.append([json.loads(line)["train_loss"] for line in (tmp_path / name / "metrics.jsonl").open()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_precision_auto_picks_bf16_fp16_or_fp32(monkeypatch):
    from kogpt2.runtime import pick_precision, use_compile

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pick_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert pick_precision("auto", cuda) == "fp16"
    assert pick_precision("auto", torch.device("cpu")) == "fp32" and pick_precision("fp16", cuda) == "fp16"
    assert use_compile("auto", cuda) and not use_compile("auto", torch.device("cpu")) and use_compile("on", cuda)


def test_deterministic_is_switched_on_and_kept_by_a_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert run_main("--epoch", 1, *TINY, "--batch_size", 8, "--save_path", tmp_path, "--deterministic") == 0
        assert torch.are_deterministic_algorithms_enabled()
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        torch.use_deterministic_algorithms(False)
        capsys.readouterr()
        assert run_main("--epoch", 2, *TINY, "--batch_size", 8, "--save_path", tmp_path, "--load_path", tmp_path) == 0
        assert "--deterministic" in capsys.readouterr().out and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
