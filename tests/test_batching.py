"""Continuous batching: each request gets the text it gets alone (the CLI's), whatever shares the batch; a request
that is cancelled leaves within one step; a full waiting line refuses at once."""
import threading
import time

import pytest
import torch

from kogpt2.defaults import SamplingSettings
from kogpt2.generation.batching import Batcher, Request, TokenScore
from kogpt2.generation.engine import TextSampler
from kogpt2.model.gpt import GPT, GPTConfig
from kogpt2.store.opening import open_model


@pytest.fixture(scope="module")
def sampler(trained) -> TextSampler:
    opened = open_model(str(trained / "KoGPT2_best.tar"))
    return TextSampler(opened.model.eval(), opened.tokenizer)


class Collected:
    def __init__(self, n: int, on_piece=None) -> None:
        self.texts, self.scores, self.prompt = [""] * n, [[] for _ in range(n)], None
        self.done, self.on_piece = threading.Event(), on_piece

    def __call__(self, event) -> None:
        if event is None:
            self.done.set()
        elif isinstance(event, list):
            self.prompt = event
        elif isinstance(event, TokenScore):
            self.scores[event.index].append(event)
        else:
            self.texts[event.index] += event.text
            if self.on_piece:
                self.on_piece()


SETTINGS = [SamplingSettings(temperature=0, text_size=40),
            SamplingSettings(temperature=0.9, top_k=20, text_size=30, repetition_penalty=1.3, presence_penalty=0.5),
            SamplingSettings(temperature=1.0, top_p=0.8, text_size=25, frequency_penalty=1.0, stop=("다",)),
            SamplingSettings(temperature=0.7, no_repeat_ngram=2, text_size=35)]


@pytest.mark.parametrize("static", [False, True])
def test_each_request_gets_the_text_it_gets_alone(sampler, static):
    batcher = Batcher(sampler, max_batch=8, max_waiting=16, static=static)
    asks = [(f"{i}번째 이야기", SETTINGS[i % 4], i, 1 + i % 3) for i in range(12)]
    got = [Collected(n) for *_, n in asks]
    for (prompt, settings, seed, n), collected in zip(asks, got):
        assert batcher.submit(Request(sampler.prompt_ids(prompt), settings, seed, n, collected))
    for collected in got:
        assert collected.done.wait(60)
    assert batcher.steps < sum(s.text_size for _, s, *_ in asks)  # they shared steps
    for (prompt, settings, seed, n), collected in zip(asks, got):
        assert collected.texts == sampler.complete(sampler.prompt_ids(prompt), settings, seed, n)


def test_a_cancelled_request_leaves_within_one_step(sampler):
    batcher = Batcher(sampler, max_batch=8, max_waiting=4)
    endless = SamplingSettings(text_size=200)
    steps_at = {}

    def cancel_after_three() -> None:
        collected.pieces = getattr(collected, "pieces", 0) + 1
        if collected.pieces == 3:
            steps_at["cancel"] = batcher.steps
            request.cancelled.set()

    collected = Collected(2, cancel_after_three)
    request = Request(sampler.prompt_ids("긴 이야기"), endless, 1, 2, collected,
                      logit_bias={sampler.tokenizer.eos_id: -100.0})
    other = Collected(1)
    assert batcher.submit(request) and batcher.submit(Request(sampler.prompt_ids("다른 이야기"), endless, 2, 1, other,
                                                              logit_bias={sampler.tokenizer.eos_id: -100.0}))
    assert collected.done.wait(60)
    assert batcher.steps - steps_at["cancel"] <= 1
    assert other.done.wait(60) and len(other.texts[0]) > 0  # the other request ran on to its end


def test_a_request_that_fails_fails_alone(sampler):
    batcher = Batcher(sampler, max_batch=8, max_waiting=4)
    good, bad = Collected(1), Collected(1)
    errors = []
    failing = lambda event: errors.append(event) if isinstance(event, Exception) else bad(event)  # noqa: E731
    settings = SamplingSettings(text_size=60)
    assert batcher.submit(Request(sampler.prompt_ids("오늘"), settings, 1, 1, good))
    assert batcher.submit(Request(sampler.prompt_ids("내일"), settings, 2, 1, failing,
                                  logit_bias={100: float("nan")}))  # a distribution of NaNs cannot be drawn from
    assert good.done.wait(60) and bad.done.wait(60)
    assert len(errors) == 1 and bad.texts == [""]
    assert good.texts == sampler.complete(sampler.prompt_ids("오늘"), settings, 1)  # as if alone


def test_a_full_waiting_line_refuses_at_once(sampler):
    batcher = Batcher(sampler, max_batch=1, max_waiting=1)
    long = dict(settings=SamplingSettings(text_size=200), seed=1, n=1)
    first, second = Collected(1), Collected(1)
    requests = [Request(sampler.prompt_ids("하나"), emit=first, **long),
                Request(sampler.prompt_ids("둘"), emit=second, **long)]
    assert batcher.submit(requests[0])
    while batcher.load["rows"] == 0:
        time.sleep(0.001)
    assert batcher.submit(requests[1])  # waits for the one row
    assert not batcher.submit(Request(sampler.prompt_ids("셋"), emit=Collected(1), **long))
    for request in requests:
        request.cancelled.set()
    assert first.done.wait(30) and second.done.wait(30)


def test_echoed_prompt_scores_are_the_models_log_probabilities(sampler):
    batcher = Batcher(sampler, max_batch=4, max_waiting=4)
    prompt = sampler.prompt_ids("우리는 오늘 바다에 갔다")
    collected = Collected(1)
    assert batcher.submit(Request(prompt, None, 0, 1, collected, logprobs=2, echo=True))
    assert collected.done.wait(30) and collected.texts == [""]  # scored only
    with torch.no_grad():
        expected = sampler.model(torch.tensor([prompt]))[0].log_softmax(-1)  # [prompt, vocab]
    scores = collected.prompt
    assert [s.token for s in scores] == prompt and scores[0].logprob is None
    for place, score in enumerate(scores[1:]):
        assert score.logprob == pytest.approx(expected[place, prompt[place + 1]].item(), abs=1e-4)
        assert [token for token, _ in score.top] == expected[place].topk(2).indices.tolist()


def test_rows_at_different_positions_step_as_each_would_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    prompts = [[1, 5, 7, 9, 2], [3, 4], [8, 8, 8]]
    cache = model.kv_cache(3, 32)
    with torch.no_grad():
        for row, ids in enumerate(prompts):
            alone = model.kv_cache(1, len(ids))
            model.hidden_states(torch.tensor([ids]), torch.arange(len(ids)), alone)
            cache.copy_row(0, row, len(ids), alone)
        positions = torch.tensor([[len(ids)] for ids in prompts])  # [3, 1]
        logits = model(torch.tensor([[11], [12], [13]]), positions, cache)[:, -1]
        alone = [model(torch.tensor([ids + [11 + row]]))[0, -1] for row, ids in enumerate(prompts)]
    torch.testing.assert_close(logits, torch.stack(alone), atol=1e-5, rtol=1e-5)
