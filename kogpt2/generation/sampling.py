"""Small pure functions over next-token logits [batch, vocab]; generation chains them."""
from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: make every token already in ``previous`` [batch, time] less likely (1.0 = off)."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(1, previous)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, previous, seen)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: lower each token by ``presence`` once it has been generated, and by ``frequency`` for each
    time it has; ``counts`` [batch, vocab] counts the generated tokens (the prompt's do not count)."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add ``bias`` [k] to the logits of token ``ids`` [k] (OpenAI's ``logit_bias``: -100 bans a token, 100 forces
    it)."""
    if not len(ids):
        return logits
    return logits.index_add(1, ids, bias.to(logits.dtype).expand(logits.shape[0], -1))


def block_repeated_ngrams(logits: torch.Tensor, previous: list[list[int]], n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in that row (0 = off)."""
    if n <= 0:
        return logits
    rows, banned = [], []
    for row, ids in enumerate(previous):
        if len(ids) < n:
            continue
        prefix = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
        tokens = [ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == prefix]
        rows += [row] * len(tokens)
        banned += tokens
    if not rows:
        return logits
    # one copy of the whole index to the device, queued (a copy per row would make the host wait for the GPU)
    index = torch.tensor([rows, banned], pin_memory=logits.is_cuda).to(logits.device, non_blocking=True)  # [2, k]
    return logits.index_put((index[0], index[1]), torch.full((), float("-inf"), dtype=logits.dtype,
                                                             device=logits.device))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (1.0 = all)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= p  # the token that crosses p stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


GREEDY_BELOW = 1e-5  # a lower temperature is greedy (as vLLM's): dividing by it would overflow the logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row: greedy at temperature 0 (or below ``GREEDY_BELOW``), else a draw from the filtered
    distribution.

    With top-k the nucleus is cut among the k candidates only: the same tokens as filtering the whole vocabulary,
    without sorting 51,200 logits every step.
    """
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if 0 < top_k < logits.shape[-1]:
        candidates, ids = torch.topk(logits, top_k, dim=-1)
        choice = draw_one(top_p_filter(candidates, top_p).softmax(dim=-1), generator)
        return ids.gather(-1, choice[:, None]).squeeze(-1)
    return draw_one(top_p_filter(logits, top_p).softmax(dim=-1), generator)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [batch, n], drawn as ``torch.multinomial(probs, 1)`` draws it (a race of
    exponential clocks: the same indices from the same generator), without its checks of the distribution, which
    make the host wait for the device on CUDA at every token; ``drawable`` is that check, left on the device."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)  # [batch]


def drawable(logits: torch.Tensor) -> torch.Tensor:
    """[batch]: True where a row's softmax is a distribution (no NaN, no +inf, some token allowed)."""
    broken = (logits.isnan() | (logits == float("inf"))).any(dim=-1)
    return ~broken & (logits > float("-inf")).any(dim=-1)
