"""Decoding strategies for any autoregressive decoder behind a small `DecodeState` interface: greedy, sampling
(temperature, top-k) and beam search with a length penalty (Hugging Face's definition: a finished hypothesis scores
its summed log-probability / length ** length_penalty, its length counting the EOS).

A state owns the model's caches: `step(tokens)` feeds one new token per row and returns the next-token logits,
`reorder(index)` keeps / repeats rows (beams that survive). Tests drive the search with a constructed state.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

STRATEGIES = ("greedy", "sample", "beam")


class DecodeState(Protocol):
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, 1) the newest token of each row -> (N, V) logits of the next one."""
        ...

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (N,) of every cache, in that order."""
        ...


def filter_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    if top_k is None:
        return logits
    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
    return logits.masked_fill(logits < kth, float("-inf"))


@torch.no_grad()
def greedy_or_sample(
    state: DecodeState,
    start: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`start` (N,) first decoder token per row -> (N, max_new_tokens) tokens (after a row's EOS: EOS again).
    Temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the top k."""
    tokens = start[:, None]
    out = []
    finished = torch.zeros(start.size(0), dtype=torch.bool, device=start.device)
    for _ in range(max_new_tokens):
        logits = state.step(tokens).float()
        if temperature == 0:
            tokens = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = F.softmax(filter_top_k(logits / temperature, top_k), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator)
        if eos_id is not None:
            tokens = tokens.masked_fill(finished[:, None], eos_id)
            finished |= tokens.squeeze(1) == eos_id
        out.append(tokens)
        if eos_id is not None and bool(finished.all()):
            break
    return pad_to(torch.cat(out, dim=1), max_new_tokens, eos_id)


def pad_to(tokens: torch.Tensor, length: int, fill: int | None) -> torch.Tensor:
    """Right-pad (N, T) token rows to `length` with `fill` (EOS: the rows ended)."""
    if tokens.size(1) >= length or fill is None:
        return tokens
    return F.pad(tokens, (0, length - tokens.size(1)), value=fill)


class Hypotheses:
    """The `num_beams` best finished sequences of one source, by length-normalised score."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], logprob: float) -> None:
        self.items.append((logprob / max(len(tokens), 1) ** self.length_penalty, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams :]

    def done(self, best_running: float, length: int) -> bool:
        """No running beam can still beat the worst kept hypothesis (Hugging Face's `early_stopping=False` test)."""
        if len(self.items) < self.num_beams:
            return False
        return self.items[-1][0] >= best_running / length**self.length_penalty

    def best(self) -> tuple[float, list[int]]:
        return self.items[0]


@torch.no_grad()
def beam_search(
    state: DecodeState,
    start: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over `state`, whose rows are `num_beams` copies of each source (source b: rows b*K..b*K+K-1);
    `start` (B,) first decoder token per source. Returns the best sequence per source (B, max_new_tokens), EOS
    included and EOS-padded, and its length-normalised log-probability (B,)."""
    B, K, device = start.size(0), num_beams, start.device
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # every beam starts equal: only the first may expand at step one
    tokens = start.repeat_interleave(K)[:, None]
    history = torch.empty(B * K, 0, dtype=torch.long, device=device)
    finished = [Hypotheses(K, length_penalty) for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(state.step(tokens).float(), dim=-1)  # (B K, V)
        V = logprobs.size(-1)
        candidates = (scores.view(B * K, 1) + logprobs).view(B, K * V)
        top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=1)  # enough to keep K that go on
        beam, token = top_index // V, top_index % V
        ends = token == eos_id if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
        # EOS candidates ranked among the first K finish a hypothesis; the best K others continue.
        for b, k in (ends[:, :K] & ~done[:, None]).nonzero().tolist():
            row = b * K + int(beam[b, k])
            finished[b].add(history[row].tolist() + [eos_id], float(top_scores[b, k]))
        go_on = ~ends
        rank = go_on.long().cumsum(dim=1)
        keep = go_on & (rank <= K)
        chosen = keep.nonzero()[:, 1].view(B, K)  # each row has at least K non-EOS among 2K candidates
        scores = top_scores.gather(1, chosen)
        rows = (torch.arange(B, device=device)[:, None] * K + beam.gather(1, chosen)).flatten()
        tokens = token.gather(1, chosen).view(B * K, 1)
        history = torch.cat([history[rows], tokens], dim=1)
        state.reorder(rows)
        length = step + 1
        for b in range(B):
            if not done[b] and finished[b].done(float(scores[b, 0]), length):
                done[b] = True
        if bool(done.all()):
            break
    for b in range(B):  # sources that ran out of steps: their running beams count as they are
        if not done[b]:
            for k in range(K):
                finished[b].add(history[b * K + k].tolist(), float(scores[b, k]))
    best = [finished[b].best() for b in range(B)]
    fill = eos_id if eos_id is not None else 0
    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
    for b, (_, seq) in enumerate(best):
        out[b, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
    return out, torch.tensor([score for score, _ in best], device=device)
