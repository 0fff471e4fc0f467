"""Each logits filter on its own, on hand-made numbers."""
import math

import torch

from kogpt2.generation.sampling import (apply_logit_bias, apply_presence_frequency, apply_repetition_penalty,
                                       block_repeated_ngrams, sample_next, top_p_filter)

NEG = float("-inf")


def test_temperature_0_is_greedy_and_lower_temperatures_pick_the_top_token_more_often():
    logits = torch.tensor([[1.0, 2.0, 1.5]])
    assert {sample_next(logits, 0.0, 0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(20)} == {1}
    top = [sum(sample_next(logits, t, 0, 1.0, torch.Generator().manual_seed(s)).item() == 1 for s in range(400))
           for t in (0.3, 1.0, 5.0)]
    assert top[0] > top[1] > top[2] > 400 / 3 - 60


def test_top_k_draws_only_among_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    draws = {sample_next(logits, 5.0, 2, 1.0, torch.Generator().manual_seed(s)).item() for s in range(100)}
    assert draws == {1, 3}
    everything = {sample_next(logits, 50.0, 0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert everything == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs.log(), 0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert torch.isfinite(top_p_filter(probs.log(), 0.5)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(probs.log(), 1.0), probs.log())


def test_top_p_works_per_row_on_unsorted_logits():
    logits = torch.tensor([[0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[False, True, False], [True, False, False]]


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_no_repeat_ngram_bans_completing_a_seen_ngram():
    logits = torch.zeros(2, 6)
    out = block_repeated_ngrams(logits, [[1, 2, 3, 1, 2], [4, 5]], 3)
    assert out[0].tolist() == [0, 0, 0, NEG, 0, 0]  # "1 2" was followed by 3 before
    assert out[1].tolist() == [0] * 6
    assert block_repeated_ngrams(logits, [[1, 1]], 1)[0, 1] == NEG


def test_greedy_and_sampling():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert sample_next(logits, 0.0, 0, 1.0).item() == 1
    assert sample_next(logits, 1.0, 1, 1.0).item() == 1  # top_k 1 is greedy too
    draws = [sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(s)).item() for s in range(200)]
    share = draws.count(1) / len(draws)
    expected = math.exp(2) / (1 + math.exp(2) + math.exp(1))
    assert abs(share - expected) < 0.1


def test_top_k_then_top_p_draws_from_the_same_set_as_full_filtering():
    torch.manual_seed(3)
    logits = torch.randn(4, 500) * 3
    scaled = logits / 0.7
    top_k = scaled.masked_fill(scaled < torch.topk(scaled, 20).values[:, -1:], float("-inf"))
    allowed = torch.isfinite(top_p_filter(top_k, 0.8))
    for seed in range(50):
        token = sample_next(logits, 0.7, 20, 0.8, torch.Generator().manual_seed(seed))
        assert allowed[torch.arange(4), token].all()


def test_presence_and_frequency_penalties_lower_generated_tokens_by_openais_rule():
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    counts = torch.tensor([[0, 1, 3], [2, 0, 0]])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[1.0, 0.25, -0.25], [-1.0, 0.0, 0.0]]
    assert apply_presence_frequency(logits, counts, 0.0, 0.0) is logits
    assert apply_presence_frequency(logits, counts, -1.0, 0.0)[0].tolist() == [1.0, 2.0, 2.0]  # negative: favour


def test_logit_bias_adds_to_its_tokens_only():
    logits = torch.zeros(2, 4)
    out = apply_logit_bias(logits, torch.tensor([3, 1]), torch.tensor([-100.0, 2.5]))
    assert out.tolist() == [[0.0, 2.5, 0.0, -100.0]] * 2
    forced = apply_logit_bias(logits, torch.tensor([2]), torch.tensor([100.0]))
    assert sample_next(forced, 1.0, 0, 1.0, torch.Generator().manual_seed(0)).tolist() == [2, 2]


def test_draw_one_draws_what_multinomial_draws_without_waiting_for_the_device():
    """The same index as torch.multinomial(probs, 1) from the same generator state, row by row, zeros included:
    seeded text does not change; only multinomial's host-side checks are gone (``drawable`` replaces them)."""
    from kogpt2.generation.sampling import draw_one

    for seed in range(50):
        probs = torch.rand(4, 300, generator=torch.Generator().manual_seed(1000 + seed)) ** 4
        probs[:, ::3] = 0  # impossible tokens
        probs /= probs.sum(-1, keepdim=True)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(draw_one(probs, torch.Generator().manual_seed(seed)), want)


def test_drawable_marks_rows_with_no_distribution():
    from kogpt2.generation.sampling import drawable

    inf = float("inf")
    logits = torch.tensor([[0.0, 1.0, -inf], [float("nan"), 0.0, 0.0], [inf, 0.0, 0.0], [-inf, -inf, -inf]])
    assert drawable(logits).tolist() == [True, False, False, False]
