"""generator.py on a tiny trained model: reproducible, exact to full-forward greedy decoding, scriptable."""
import csv
import io
import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, payload_and_record, run_generator

from kogpt2.defaults import SamplingSettings
from kogpt2.generation.engine import TextSampler, TextStream, TokenList, generate_ids, never_generated
from kogpt2.generation.prompt_loop import PromptLoop
from kogpt2.store.checkpoint import load_checkpoint
from kogpt2.store.opening import model_from_checkpoint


@pytest.fixture(scope="module")
def model_and_tokenizer(trained):
    path = trained / "KoGPT2_best.tar"
    model, tokenizer = model_from_checkpoint(*payload_and_record(path))
    return model.eval(), tokenizer


def generate(model, tokenizer, prompt, seed=None, **settings):
    out = []
    loop = PromptLoop(TextSampler(model, tokenizer), SamplingSettings(**settings), seed, out=type("Sink", (), {
        "write": lambda self, t: out.append(t), "flush": lambda self: None})())
    return loop.run(prompt)[0].text, "".join(out)


def argmax_by_full_forwards(model, ids, steps, eos_id, suppress):
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            logits[suppress] = float("-inf")
            token = logits.argmax().item()
            if token == eos_id:
                break
            ids.append(token)
            new.append(token)
    return new


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_k=1)], ids=["t0", "topk1"])
def test_greedy_equals_argmax_of_full_forwards(model_and_tokenizer, settings):
    model, tokenizer = model_and_tokenizer
    prompt = [tokenizer.bos_id] + tokenizer.encode("오늘 아침에")
    suppress = never_generated(tokenizer)
    assert suppress == [tokenizer.bos_id, tokenizer.pad_id, tokenizer.unk_id]
    want = argmax_by_full_forwards(model, prompt, 30, tokenizer.eos_id, suppress)
    got = TokenList(tokenizer.eos_id)
    list(generate_ids(model, prompt, SamplingSettings(text_size=30, **settings), [got], suppress=suppress))
    assert got.ids == want


def test_sliding_window_keeps_generating_past_the_context(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = SamplingSettings(temperature=1.0, text_size=model.config.n_positions + 50)
    sample = TokenList()
    list(generate_ids(model, [tokenizer.bos_id], settings, [sample], rng=torch.Generator().manual_seed(0)))
    assert len(sample.ids) == model.config.n_positions + 50


def test_same_seed_same_text_and_other_seeds_differ(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    a = generate(model, tokenizer, "우리", seed=5, text_size=40)[0]
    assert generate(model, tokenizer, "우리", seed=5, text_size=40)[0] == a
    others = {generate(model, tokenizer, "우리", seed=s, text_size=40)[0] for s in range(6, 11)}
    assert others - {a}


def test_streamed_text_equals_the_result_and_starts_with_the_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text, printed = generate(model, tokenizer, "내가 항상", seed=2, text_size=40)
    assert printed == text + "\n" and text.startswith("내가 항상")
    assert "</s>" not in printed and "<s>" not in printed


def test_stops_at_eos_text_size_and_stop_strings(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = [tokenizer.bos_id] + tokenizer.encode("오늘")
    ended, endless = TokenList(tokenizer.eos_id), TokenList()
    steps = list(generate_ids(model, prompt, SamplingSettings(temperature=0, text_size=200), [ended]))
    assert len(steps) == len(ended.ids) + 1 < 200  # ended at </s>, which the sample does not keep
    assert len(list(generate_ids(model, prompt, SamplingSettings(temperature=1, text_size=3), [endless]))) == 3
    full, _ = generate(model, tokenizer, "오늘", temperature=1.0, seed=0, text_size=60)
    continuation = full[len("오늘"):]
    stop = continuation[len(continuation) // 2:][:2]
    assert len(stop) == 2
    stopped, printed = generate(model, tokenizer, "오늘", temperature=1.0, seed=0, text_size=60, stop=[stop])
    assert stopped == "오늘" + continuation[:continuation.index(stop)] and printed == stopped + "\n"


def test_text_stream_never_prints_half_a_character(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer

    class Bytewise:  # a tokenizer whose pieces split UTF-8 characters
        bos_id = 0

        def decode(self, ids):
            return bytes(ids[1:]).decode("utf-8", errors="replace")

    stream = TextStream(Bytewise(), [0])
    pieces = [stream.push(b) for b in "한글".encode("utf-8")]
    assert pieces == ["", "", "한", "", "", "글"]


def test_piped_prompts_and_loops(trained, model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    cli_defaults = dict(top_k=40, top_p=0.9)
    expected = {p: generate(model, tokenizer, p, seed=1, text_size=8, **cli_defaults)[1] for p in ("가", "나", "다", "첫", "둘")}
    ckpt = trained / "KoGPT2_best.tar"
    assert run_generator("--load_path", ckpt, "--seed", 1, "--text_size", 8, stdin="가\n나\n\n다\n") == 0
    assert capsys.readouterr().out == expected["가"] + expected["나"] + expected["다"]  # no "input :" prompt
    assert run_generator("--load_path", ckpt, "--seed", 1, "--text_size", 8, "--tmp_sent", "첫", "--loops", 2,
                         stdin="둘\n셋\n") == 0
    assert capsys.readouterr().out == expected["첫"] + expected["둘"]


def test_slash_command_changes_the_next_result(trained, model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    greedy, _ = generate(model, tokenizer, "오늘", temperature=0, text_size=20, top_k=40, top_p=0.9)
    assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--text_size", 20,
                         stdin="/temperature 0\n오늘\n") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["temperature = 0", greedy]


def test_samples_folder_gets_one_file_per_result(trained, tmp_path, capsys):
    folder = tmp_path / "new" / "samples"
    assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--samples", folder, "--seed", 4,
                         "--text_size", 10, "--num_samples", 2, stdin="하나\n둘\n") == 0
    files = sorted(folder.iterdir())
    assert len(files) == 4
    header, body = files[0].read_text(encoding="utf-8").split("\n", 1)
    settings = json.loads(header)
    assert settings["seed"] == 4 and settings["prompt"] in ("하나", "둘") and "temperature" in settings
    assert body.startswith(settings["prompt"])


def test_batch_csv_is_excel_readable_and_rows_regenerate(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("오늘\n우리는\n", encoding="utf-8")
    output = tmp_path / "out.csv"
    assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--prompts", prompts, "--output", output,
                         "--num_samples", 2, "--seed", 9, "--text_size", 15) == 0
    raw = output.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    assert len(rows) == 4 and rows[2]["prompt"] == "우리는"
    row = rows[3]
    again = tmp_path / "again.jsonl"
    (tmp_path / "one.txt").write_text(row["prompt"] + "\n", encoding="utf-8")
    assert run_generator("--load_path", row["checkpoint"], "--prompts", tmp_path / "one.txt", "--output", again,
                         "--num_samples", row["num_samples"], "--seed", row["seed"], "--text_size", row["text_size"],
                         "--temperature", row["temperature"], "--top_k", row["top_k"], "--top_p", row["top_p"]) == 0
    redone = [json.loads(line) for line in again.read_text(encoding="utf-8").splitlines()]
    assert redone[int(row["sample_index"])]["text"] == row["text"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.tar", "no such checkpoint file"),
    (lambda d: d / "cut.tar" if (d / "cut.tar").write_bytes(b"PK\x03\x04 truncated") else None,
     "is truncated or corrupt"),
])
def test_bad_load_path_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert run_generator("--load_path", path, "--tmp_sent", "x") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err


def test_checkpoint_whose_vocab_does_not_fit_its_tokenizer(trained, tmp_path, capsys):
    payload = load_checkpoint(trained / "KoGPT2_best.tar")
    payload["config"]["vocab_size"] += 7
    torch.save(payload, tmp_path / "odd.tar")
    assert run_generator("--load_path", tmp_path / "odd.tar", "--tmp_sent", "x") == 2
    assert "vocabulary of 1007 tokens but the tokenizer has 1000" in capsys.readouterr().err


def test_real_process_with_piped_stdin(trained):
    result = subprocess.run([sys.executable, "generator.py", "--load_path", str(trained / "KoGPT2_best.tar"),
                             "--text_size", "5", "--seed", "1"], cwd=REPO, input="하나\n둘\n셋\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    starts = [line.split("에", 1)[0][:1] for line in result.stdout.splitlines() if line[:1] in "하둘셋" and line]
    assert starts == ["하", "둘", "셋"]


def test_a_typed_line_can_be_edited_and_recalled_in_a_terminal(trained, tmp_path):
    """Under a pseudo-terminal, as typed: Left arrow moves inside the line (no escape codes in the prompt), Up recalls
    the line before."""
    pytest.importorskip("readline", reason="no line editing on this platform")
    import os
    import pty
    import select

    samples = tmp_path / "samples"
    argv = [sys.executable, "generator.py", "--load_path", str(trained / "KoGPT2_best.tar"), "--samples", str(samples),
            "--seed", "1", "--text_size", "3"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: generator.py on the terminal's other end
        os.chdir(REPO)
        os.execve(sys.executable, argv, {**os.environ, "TERM": "xterm", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
    shown = b""

    def wait_for_prompt(count: int) -> None:
        nonlocal shown
        deadline = time.monotonic() + 120
        while shown.count(b"input : ") < count:
            assert time.monotonic() < deadline, shown.decode("utf-8", "replace")
            if select.select([terminal], [], [], 1)[0]:
                shown += os.read(terminal, 4096)

    try:
        wait_for_prompt(1)
        os.write(terminal, "아침\x1b[D\x1b[D오늘 \r".encode())  # "아침", Left twice, "오늘 " before it, Enter
        wait_for_prompt(2)
        os.write(terminal, b"\x1b[A\r")  # Up: the line before, Enter
        wait_for_prompt(3)
        os.write(terminal, b"\r")  # an empty line ends
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(terminal)
    prompts = [json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])["prompt"]
               for path in sorted(samples.iterdir())]
    assert prompts == ["오늘 아침", "오늘 아침"]


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "plain"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_step_logits_equal_the_plain_forward(monkeypatch, onednn, batch):
    import kogpt2.generation.decoding_step as generate_module
    from kogpt2.model.gpt import GPT, GPTConfig

    if not onednn:
        monkeypatch.setattr(generate_module, "ONEDNN_LINEAR", None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 300, (batch, 12))
    step = generate_module.DecodingStep(model, batch)
    cache = model.kv_cache(batch, 32)
    with torch.no_grad():
        want = model(ids)
        got = [step(ids[:, :8], torch.arange(8), cache)]
        got += [step(ids[:, i:i + 1], torch.tensor([i]), cache) for i in range(8, 12)]
    for position, logits in zip(range(7, 12), got):
        assert torch.allclose(logits, want[:, position], atol=1e-5)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3)],
                         ids=["greedy", "pure", "filtered"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_fixed_shape_decoding_gives_the_same_tokens(model_and_tokenizer, settings, num_samples):
    """The CUDA graph path (fixed-shape steps over the whole window), run on the CPU, past the context window too."""
    model, tokenizer = model_and_tokenizer
    prompt = [tokenizer.bos_id] + tokenizer.encode("오늘 아침에")
    full = SamplingSettings(text_size=model.config.n_positions + 40, **settings)
    runs = []
    for static in (False, True):
        samples = [TokenList() for _ in range(num_samples)]
        list(generate_ids(model, prompt, full, samples, torch.Generator().manual_seed(5), never_generated(tokenizer),
                          static=static))
        runs.append([sample.ids for sample in samples])
    assert runs[0] == runs[1] and {len(ids) for ids in runs[0]} == {model.config.n_positions + 40}


class EndsAfter(TokenList):
    """A sample that ends after ``length`` tokens (as a stop string would end it)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def push(self, token: int) -> bool:
        super().push(token)
        return len(self.ids) == self.length


def test_fixed_shape_decoding_draws_as_the_shrinking_batch_when_samples_end_apart(model_and_tokenizer):
    """An ended sample draws no more on either path, so the samples still going draw the same tokens."""
    model, tokenizer = model_and_tokenizer
    prompt = [tokenizer.bos_id] + tokenizer.encode("오늘 아침에")
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.2, text_size=60)
    runs = []
    for static in (False, True):
        samples = [EndsAfter(length) for length in (7, 60, 23)]
        list(generate_ids(model, prompt, settings, samples, torch.Generator().manual_seed(3), static=static))
        runs.append([sample.ids for sample in samples])
    assert runs[0] == runs[1] and [len(ids) for ids in runs[0]] == [7, 60, 23]


def test_the_captured_decoding_step_is_reused_across_calls(model_and_tokenizer, monkeypatch):
    """On CUDA a capture synchronises and empties the allocator's cache, so it happens once per model, batch size and
    visible length, not once per prompt. Counted on the CPU with a stand-in for the CUDA graph (replay reruns the
    captured step into the same output buffer)."""
    import kogpt2.generation.decoding_step as steps

    class StandInGraph:
        def __init__(self, step, visible):
            self.step, self.visible = step, visible

        def replay(self):
            self.step.logits[self.visible].copy_(self.step._forward(self.visible))

    def capture(step, visible):
        step.captures += 1
        step.logits[visible], step.graphs[visible] = step._forward(visible), StandInGraph(step, visible)

    monkeypatch.setattr(steps.GraphStep, "_capture", capture)
    model, tokenizer = model_and_tokenizer
    for batch in (1, 2):
        steps.graph_step(model, batch).capture = True
    settings = SamplingSettings(temperature=1.0, text_size=80)  # through the visible lengths 32, 64 and 128

    def draw(batch: int, static: bool, seed: int) -> list[list[int]]:
        samples = [TokenList() for _ in range(batch)]
        prompt = [tokenizer.bos_id] + tokenizer.encode("오늘")
        list(generate_ids(model, prompt, settings, samples, torch.Generator().manual_seed(seed), static=static))
        return [sample.ids for sample in samples]

    for seed in range(3):
        for batch in (1, 2):
            assert draw(batch, True, seed) == draw(batch, False, seed)
    for batch in (1, 2):
        step = steps.graph_step(model, batch)
        assert sorted(step.graphs) == [32, 64, 128] and step.captures == 3


def tiny_model(n_positions: int):
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, n_positions=n_positions, n_embd=48, n_layer=2, n_head=4)).eval()


def test_the_visible_lengths_are_the_window_and_its_halves():
    from kogpt2.generation.decoding_step import visible_length, visible_lengths

    assert visible_lengths(1024) == [128, 256, 512, 1024] and visible_lengths(32) == [4, 8, 16, 32]
    assert [visible_length(slot, [128, 256, 512, 1024]) for slot in (0, 127, 128, 511, 1023)] == [128, 128, 256, 512,
                                                                                                    1024]


@pytest.mark.parametrize("per_row", [False, True], ids=["one position", "a position per row"])
def test_a_step_over_the_fewest_visible_slots_gives_the_logits_of_the_plain_forward(per_row):
    """Across every visible length (4, 8, 16, 32 slots of a 32-token window), over a cache whose slots hold another
    text's keys: no slot past a row's position is read."""
    from kogpt2.generation.decoding_step import GraphStep

    model = tiny_model(32)
    ids = torch.randint(0, 300, (2, 32))
    cache = model.kv_cache(2, 32)
    cache.buffer.normal_()
    step = GraphStep(model, cache)
    lead = 5 if per_row else 0  # the second row runs this many tokens ahead
    with torch.no_grad():
        want = model(ids)  # [2, 32, vocab]
        for position in range(lead):  # the first row rewrites its first slot meanwhile
            step(torch.stack([ids[0, 0], ids[1, position]]), [0, position])
        for position in range(32 - lead):
            logits = step(torch.stack([ids[0, position], ids[1, position + lead]]),
                          [position, position + lead] if per_row else position)
            assert torch.allclose(logits[0], want[0, position], atol=1e-5)
            assert torch.allclose(logits[1], want[1, position + lead], atol=1e-5)


class Recorded:
    """What the decoding asks of the device and the host, in order."""

    def __init__(self, monkeypatch):
        import kogpt2.generation.engine as engine

        self.events = []
        step, prefill, read = engine.Decoder.step, engine.Decoder.prefill, engine.HostCopy.read

        def recorded_step(decoder, tokens):
            assert not decoder.full
            self.events.append("step")
            return step(decoder, tokens)

        def recorded_prefill(decoder, ids):
            self.events.append("prefill")
            return prefill(decoder, ids)

        def recorded_read(drawn):
            self.events.append("read")
            return read(drawn)

        monkeypatch.setattr(engine.Decoder, "step", recorded_step)
        monkeypatch.setattr(engine.Decoder, "prefill", recorded_prefill)
        monkeypatch.setattr(engine.HostCopy, "read", recorded_read)


@pytest.mark.parametrize("static", [False, True], ids=["shrinking", "fixed shape"])
def test_the_next_step_is_queued_before_the_host_reads_the_tokens(monkeypatch, static):
    """The device computes step k+1 while the host waits for step k's tokens: one read per draw (not per sample),
    each after the next step was queued; a sample that ends changes nothing in that; no step over a full cache (a
    slide prefills once the host has the text) and none past the last token."""
    recorded = Recorded(monkeypatch)
    samples = [EndsAfter(5), TokenList(), EndsAfter(33)]
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, text_size=40)
    list(generate_ids(tiny_model(32), [1, 2, 3], settings, samples, torch.Generator().manual_seed(0), static=static))
    # slots 3..31 take 29 steps; the full cache slides to its newest 16 tokens; 9 more steps; the 40th token
    assert recorded.events == (["prefill"] + ["step", "read"] * 29 + ["read", "prefill"] + ["step", "read"] * 9
                               + ["read"])
    assert [len(sample.ids) for sample in samples] == [5, 40, 33]


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.9, top_k=50, no_repeat_ngram=2),
                                      dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
                                           frequency_penalty=0.7)],
                         ids=["greedy", "pure", "ngram", "penalties"])
@pytest.mark.parametrize("num_samples", [1, 2, 3, 4])
def test_samples_ending_apart_draw_alike_on_both_steps_across_slides(settings, num_samples):
    """Samples that end before, across and after the window's slides (a 32-token window, 70 tokens), on the
    shrinking batch and on the fixed shape (every row stays, over each visible length in turn)."""
    model, ends = tiny_model(32), (70, 3, 33, 17)[:num_samples]
    runs = []
    for static in (False, True):
        samples = [EndsAfter(length) for length in ends]
        list(generate_ids(model, [1, 2, 3], SamplingSettings(text_size=70, **settings), samples,
                          torch.Generator().manual_seed(num_samples), [0], static=static))
        runs.append([sample.ids for sample in samples])
    assert runs[0] == runs[1] and [len(ids) for ids in runs[0]] == list(ends)


@pytest.mark.parametrize("static", [False, True], ids=["shrinking", "fixed shape"])
def test_greedy_samples_ending_apart_equal_argmax_of_full_forwards(static):
    """Each sample's tokens, ended by length at its own step or by the end token, are the full recompute's."""
    model = tiny_model(64)
    want = argmax_by_full_forwards(model, [1, 2, 3], 55, None, [0])
    end_id = want[40]
    samples = [TokenList(end_id), EndsAfter(4), EndsAfter(21), TokenList()]
    list(generate_ids(model, [1, 2, 3], SamplingSettings(temperature=0, text_size=55), samples, suppress=[0],
                      static=static))
    assert [sample.ids for sample in samples] == [want[:want.index(end_id)], want[:4], want[:21], want]


def test_a_decoding_step_makes_its_attention_mask_once_not_in_every_layer():
    """A boolean mask is turned into an additive one by attention in each layer (a kernel per layer on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kogpt2.generation.decoding_step import GraphStep

    class Counted(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.wheres = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.wheres += func.overloadpacket is torch.ops.aten.where
            return func(*args, **kwargs or {})

    from kogpt2.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=300, n_positions=32, n_embd=48, n_layer=6, n_head=4)).eval()
    step = GraphStep(model, model.kv_cache(2, 32))
    with torch.no_grad(), Counted() as counted:
        step(torch.tensor([5, 6]), [3, 9])
    assert counted.wheres == 1
