"""What only a GPU can show: real CUDA graphs captured once per visible length and equal to eager decoding (the CLI's
and the server's batch), the drawn tokens' pinned copies, a compiled step that compiles once, fp16's gradient scaler
skipping an overflowing step, FlexAttention's fused kernel equal to the dense mask in bf16, the attention kernel
measured on Hopper, and the head's chunked bf16 loss equal to the plain one in a fraction of its memory. Run with
``pytest -m gpu`` on a machine with CUDA (``bench/gpu_check.py`` does); skipped elsewhere."""
import json

import pytest
import torch
from conftest import SAMPLE_CSV, run_main

pytestmark = pytest.mark.gpu
TINY = ("--data_file_path", SAMPLE_CSV, "--pretrained", "scratch:tiny", "--max_len", 64, "--seed", 1, "--device", "cuda")


@pytest.fixture
def cuda_model():
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=2)).cuda().eval()


def draw(model, batch: int, static: bool) -> list[list[int]]:
    from kogpt2.defaults import SamplingSettings
    from kogpt2.generation.engine import TokenList, generate_ids

    samples = [TokenList() for _ in range(batch)]
    list(generate_ids(model, [1, 5, 6], SamplingSettings(temperature=0, text_size=150), samples, static=static))
    return [sample.ids for sample in samples]


def test_graph_decoding_is_captured_once_per_visible_length_and_equals_eager(cuda_model):
    from kogpt2.generation.decoding_step import graph_step

    for _ in range(3):
        assert draw(cuda_model, 2, True) == draw(cuda_model, 2, False)
    step = graph_step(cuda_model, 2)
    assert sorted(step.graphs) == [16, 32, 64, 128] and step.captures == 4


def test_sampled_tokens_read_through_pinned_copies_equal_the_eager_steps(cuda_model, monkeypatch):
    """Replayed graphs with the next step queued before each read give the tokens of the same steps run eagerly,
    for sampled rows that end apart; every read waits on a pinned copy's event."""
    from test_generator import EndsAfter

    import kogpt2.generation.engine as engine
    from kogpt2.defaults import SamplingSettings
    from kogpt2.generation.decoding_step import graph_step

    pinned, read = [], engine.HostCopy.read
    monkeypatch.setattr(engine.HostCopy, "read", lambda drawn: pinned.append(drawn.values.is_pinned()) or
                        read(drawn))
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.2, text_size=150)

    def run() -> list[list[int]]:
        samples = [EndsAfter(length) for length in (150, 9, 70)]
        list(engine.generate_ids(cuda_model, [1, 5, 6], settings, samples, torch.Generator("cuda").manual_seed(0),
                                 static=True))
        return [sample.ids for sample in samples]

    replayed = run()
    step = graph_step(cuda_model, 3)
    assert step.graphs and all(pinned)
    step.capture, step.graphs = False, {}
    assert run() == replayed


def test_the_servers_batch_replays_one_graph_and_draws_as_eager(cuda_model):
    """Requests that come and go at different positions, stepped by one captured graph over all the rows."""
    from test_batching import Collected

    from kogpt2.defaults import SamplingSettings
    from kogpt2.generation.batching import Batcher, Request
    from kogpt2.generation.engine import TextSampler
    from kogpt2.store.scratch import train_tokenizer

    texts = SAMPLE_CSV.read_text(encoding="utf-8").splitlines()[1:]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    sampler = TextSampler(cuda_model, tokenizer)
    got = {}
    for static in (True, False):
        batcher = Batcher(sampler, max_batch=4, max_waiting=8, static=static)
        collected = [Collected(1) for _ in range(6)]
        for i, emit in enumerate(collected):
            settings = SamplingSettings(temperature=0, text_size=20 + 9 * i)
            assert batcher.submit(Request(sampler.prompt_ids(f"{i}번째"), settings, 0, 1, emit))
        assert all(c.done.wait(60) for c in collected)
        got[static] = [c.texts for c in collected]
        if static:
            assert batcher.graph.captures == len(batcher.graph.graphs) > 1
    assert got[True] == got[False]


def test_a_short_last_batch_compiles_the_step_once(tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    assert run_main("--epoch", 2, *TINY, "--batch_size", 7, "--compile", "on", "--precision", "bf16",
                    "--save_path", tmp_path) == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, monkeypatch):
    import kogpt2.train.trainer

    calls = []
    batch_loss_sum = kogpt2.train.trainer.batch_loss_sum

    def overflow_once(*args, **kwargs):
        loss = batch_loss_sum(*args, **kwargs)
        calls.append(1)
        return loss * float("inf") if len(calls) == 1 else loss

    monkeypatch.setattr(kogpt2.train.trainer, "batch_loss_sum", overflow_once)
    assert run_main("--epoch", 1, *TINY, "--batch_size", 8, "--precision", "fp16", "--save_path", tmp_path) == 0
    scaler = torch.load(max(tmp_path.glob("KoGPT2_checkpoint_*.tar"), key=lambda p: p.stat().st_mtime),
                        weights_only=True)["scaler"]
    assert scaler["scale"] < 2.0 ** 16  # halved by the overflow, never doubled back within one short epoch
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "metrics.jsonl").open()]
    assert all(loss == loss and loss < float("inf") for loss in losses[1:])


def test_flex_attention_equals_the_dense_mask_in_bf16():
    """Chat batches on CUDA: the compiled FlexAttention kernel with the block mask gives what SDPA gives with the
    dense mask, forward and backward."""
    import torch.nn.functional as F
    from test_attention import chat_batch

    from kogpt2.model.gpt import GPT, flex_attend

    segments = chat_batch().segments.cuda()
    (_, block_mask), (_, dense_mask) = (GPT._segment_positions_and_mask(segments, flex) for flex in (True, False))
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(segments), 12, segments.shape[1], 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    results = []
    for flex in (True, False):
        y = flex_attend(q, k, v, block_mask) if flex else F.scaled_dot_product_attention(q, k, v, dense_mask)
        y.backward(grad)
        results.append([y.detach().float()] + [t.grad.float() for t in (q, k, v)])
        q.grad = k.grad = v.grad = None
    for flex, dense in zip(*results):  # output, then the gradients of q, k and v; bf16 rounds to about 0.4%
        assert (flex - dense).norm() <= 2e-2 * dense.norm()


def test_the_attention_kernel_is_measured_on_hopper():
    from torch.nn.attention import SDPBackend

    from kogpt2.runtime import ATTENTION_KERNELS, choose_attention_kernel

    order = torch._C._get_sdp_priority_order()
    try:
        choice = choose_attention_kernel(torch.device("cuda"), 4, 12, 512, 64, torch.bfloat16, 0.1)
        if torch.cuda.get_device_capability()[0] < 9:
            assert choice is None and torch._C._get_sdp_priority_order() == order
            return
        assert choice.seconds["flash"] > 0 and choice.pick in choice.seconds
        assert torch._C._get_sdp_priority_order()[0] == int(ATTENTION_KERNELS[choice.pick])
        assert int(SDPBackend.MATH) in torch._C._get_sdp_priority_order()
    finally:
        torch._C._set_sdp_priority_order(order)


def test_chat_training_compiled_on_cuda_is_one_graph(tmp_path):
    """FlexAttention's block mask and kernel inside the trainer's compiled step: one graph, no breaks (no validation
    set: evaluation runs eager, with FlexAttention compiled apart)."""
    from conftest import REPO
    from torch._dynamo.utils import counters

    counters.clear()
    assert run_main("--chat", "--data_file_path", REPO / "data" / "chat_sample.csv", "--pretrained", "scratch:tiny",
                    "--max_len", 64, "--batch_size", 8, "--seed", 1, "--device", "cuda", "--epoch", 1,
                    "--dropout", 0, "--val_ratio", 0, "--compile", "on", "--precision", "bf16",
                    "--save_path", tmp_path) == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_the_heads_chunked_bf16_loss_equals_the_plain_one_in_a_fraction_of_its_memory():
    """16 x 1024 tokens over v1's 50,000 words (padded to 50,048 inside) under bf16 autocast: the loss and gradients
    of the plain head and cross-entropy, without its [tokens, vocab] fp32 copies (some 3.3 GB each)."""
    from bench.head_memory import plain_cross_entropy

    from kogpt2.model.head_loss import IGNORE_INDEX, chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(16 * 1024, 768, device="cuda", requires_grad=True)
    weight = (torch.randn(50_000, 768, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, 50_000, (16 * 1024,), device="cuda")
    targets[::7] = IGNORE_INDEX
    forms = {"plain": lambda: plain_cross_entropy(hidden, weight, targets),
             "chunked": lambda: chunked_cross_entropy(hidden, weight, targets, 128)}
    results, peaks = {}, {}
    for name, form in forms.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = form()
        results[name] = (loss.detach(), torch.autograd.grad(loss, (hidden, weight)))
        peaks[name] = torch.cuda.max_memory_allocated() - start
    (want, want_grads), (got, got_grads) = results["plain"], results["chunked"]
    assert torch.allclose(got, want, rtol=1e-3)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-2 * w.abs().max().item(), rtol=1e-2)
    assert peaks["chunked"] < peaks["plain"] / 4, peaks
