"""The attention kernels CUDA trains with, proven on the CPU: FlexAttention for chat batches (the dense mask's loss
and gradients, one compiled graph), and the measured choice between cuDNN and flash attention on Hopper."""
import pytest
import torch
from torch.nn.attention import SDPBackend

from kogpt2.corpus.chat_format import ChatExample
from kogpt2.corpus.packing import pack_examples
from kogpt2.model.gpt import GPT, GPTConfig
from kogpt2.model.head_loss import IGNORE_INDEX
from kogpt2.runtime import CUDNN_MARGIN, choose_attention_kernel, faster_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex_calls(monkeypatch) -> list[int]:
    """FlexAttention's calls, counted. It refuses a backward on the CPU, where it has no fused kernel; its reference
    implementation (what eager CUDA runs) computes one anywhere, so the CPU can check the path's mask, positions and
    gradients."""
    import torch.nn.attention.flex_attention

    import kogpt2.model.gpt

    monkeypatch.setattr(torch.nn.attention.flex_attention, "_validate_device", lambda query, key, value: None)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.nn.attention.flex_attention.flex_attention(*args, **kwargs)

    monkeypatch.setattr(kogpt2.model.gpt, "flex_attention", counted)
    return calls


def chat_batch():
    """Rows of several chat examples each (answers-only targets), the last ones padded."""
    torch.manual_seed(0)
    examples = []
    for length in (9, 12, 7, 20, 5, 11, 16, 6):
        ids = torch.randint(10, 300, (length,)).tolist()
        examples.append(ChatExample(ids, [t if i >= 2 else IGNORE_INDEX for i, t in enumerate(ids[1:])], 1))
    data = pack_examples(examples, 32, 3)
    batch = data.batch(torch.arange(len(data.blocks)))
    assert all(len(set(row)) >= 3 for row in batch.segments.tolist())
    assert (batch.targets[:, -1] == IGNORE_INDEX).all()  # every row ends in padding
    return batch


def loss_and_gradients(model: GPT, batch, flex: bool, seed: int = 0):
    model.flex_attention = flex
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(batch.inputs, targets=batch.targets, segments=batch.segments)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_flex_attention_gives_the_dense_masks_loss_and_gradients(flex_calls):
    batch = chat_batch()
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0)).train()
    dense_loss, dense_grads = loss_and_gradients(model, batch, flex=False)
    assert not flex_calls
    flex_loss, flex_grads = loss_and_gradients(model, batch, flex=True)
    assert len(flex_calls) == 2  # a layer each
    assert torch.allclose(flex_loss, dense_loss, rtol=1e-5)
    assert all(torch.allclose(f, d, atol=1e-6, rtol=1e-4) for f, d in zip(flex_grads, dense_grads))
    with torch.no_grad():
        model.eval()
        model.flex_attention = True
        logits = model(batch.inputs, segments=batch.segments)
        model.flex_attention = False
        assert torch.allclose(logits, model(batch.inputs, segments=batch.segments), atol=1e-5)


def test_attention_dropout_keeps_the_dense_mask(flex_calls):
    """FlexAttention has no dropout: a run that drops attention weights keeps doing so, through the dense mask."""
    batch = chat_batch()
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.1)).train()
    dense, asked_for_flex = (loss_and_gradients(model, batch, flex, seed=3) for flex in (False, True))
    assert torch.equal(dense[0], asked_for_flex[0]) and not flex_calls


def test_the_compiled_flex_step_is_one_graph(flex_calls):
    """What CUDA compiles for a chat batch: the block mask and FlexAttention inside one graph, no breaks."""
    batch = chat_batch()
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0)).train()
    model.plain_autograd = model.flex_attention = True
    explained = torch._dynamo.explain(model)(batch.inputs, targets=batch.targets, segments=batch.segments)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert flex_calls  # traced through


def timings(flash, cudnn):
    """A fake GPU timing: seconds per kernel, or an exception a kernel that cannot run raises."""
    def time_kernel(kernel: SDPBackend) -> float:
        seconds = {SDPBackend.FLASH_ATTENTION: flash, SDPBackend.CUDNN_ATTENTION: cudnn}[kernel]
        if isinstance(seconds, Exception):
            raise seconds
        return seconds
    return time_kernel


def test_the_faster_kernel_wins_and_a_tie_keeps_flash():
    assert faster_attention(timings(1.0, 0.8)).pick == "cudnn"
    assert faster_attention(timings(0.8, 1.0)).pick == "flash"
    assert faster_attention(timings(1.0, 1.0)).pick == "flash"
    assert faster_attention(timings(1.0, CUDNN_MARGIN * 1.001)).pick == "flash"  # within the noise
    assert faster_attention(timings(1.0, 0.8)).seconds == {"flash": 1.0, "cudnn": 0.8}


def test_a_kernel_that_raises_is_left_out():
    no_kernel = RuntimeError("No available kernel. Aborting execution.")
    assert faster_attention(timings(no_kernel, 0.8)).pick == "cudnn"
    assert faster_attention(timings(1.0, no_kernel)).seconds == {"flash": 1.0}
    assert faster_attention(timings(no_kernel, no_kernel)) is None


@pytest.fixture
def attention_order():
    """torch's attention order, put back after the test."""
    order = torch._C._get_sdp_priority_order()
    yield order
    torch._C._set_sdp_priority_order(order)


def choose(device: str, time_kernel):
    return choose_attention_kernel(torch.device(device), 16, 12, 1024, 64, torch.bfloat16, 0.1, time_kernel)


def test_hopper_puts_the_faster_kernel_first(attention_order, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose("cuda", timings(1.0, 0.5)).pick == "cudnn"
    assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert choose("cuda", timings(0.5, 1.0)).pick == "flash"
    order = torch._C._get_sdp_priority_order()
    assert order[:2] == [int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.CUDNN_ATTENTION)]
    assert sorted(order) == sorted(attention_order)  # reordered, none lost


def test_nothing_changes_without_cuda_or_before_hopper(attention_order, monkeypatch):
    def untimed(kernel):
        raise AssertionError("timed where nothing is chosen")

    assert choose("cpu", untimed) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert choose("cuda", untimed) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose("cuda", timings(RuntimeError("no kernel"), RuntimeError("no kernel"))) is None
    assert torch._C._get_sdp_priority_order() == attention_order


def test_cuda_chooses_flex_attention_only_where_triton_can_build_it(monkeypatch):
    """Without Triton (say, Windows' CUDA wheels) FlexAttention cannot compile: chat batches keep the dense mask."""
    import kogpt2.model.gpt as gpt

    model = gpt.GPT(gpt.GPTConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    for triton in (True, False):
        monkeypatch.setattr(gpt, "has_triton", lambda: triton)
        assert model._flex(torch.device("cuda")) is triton
    assert not model._flex(torch.device("cpu"))
