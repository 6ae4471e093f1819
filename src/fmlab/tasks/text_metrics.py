"""Generation metrics, on a 0-100 scale: corpus BLEU and chrF as sacreBLEU defines them (BLEU: 13a tokenization,
4-grams, exponential smoothing, brevity penalty; chrF: character 6-grams, beta 2, whitespace ignored, precision and
recall averaged over the orders present), and ROUGE-1/2/L F1 as Google's rouge_score (torchmetrics' ROUGEScore, no
stemming). BLEU and chrF keep summed n-gram statistics, so they reduce across processes exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.text.rouge import ROUGEScore

BLEU_ORDER, CHAR_ORDER, CHRF_BETA = 4, 6, 2.0
# mteval-v13a: punctuation and symbols apart; period and comma apart unless within a number; a dash after a digit.
RULES_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
ENTITIES = {"&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">"}


@lru_cache(maxsize=2**16)
def tokenize_13a(line: str) -> list[str]:
    """sacreBLEU's default (`13a`) tokenization."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in ENTITIES.items():
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in RULES_13A:
        line = pattern.sub(replacement, line)
    return line.split()


def ngrams(tokens: list[str] | str, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_statistics(hypothesis: str, reference: str) -> list[float]:
    """[matches of order 1..4, totals of order 1..4, hypothesis length, reference length]."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    matches, totals = [], []
    for n in range(1, BLEU_ORDER + 1):
        h, r = ngrams(hyp, n), ngrams(ref, n)
        matches.append(sum(min(count, r[g]) for g, count in h.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    return [*matches, *totals, len(hyp), len(ref)]


def bleu_score(stats: list[float]) -> float:
    """Corpus BLEU (0-100) from summed `bleu_statistics`, with sacreBLEU's `exp` smoothing: the k-th order without a
    match counts as 1 / 2^k matches."""
    matches, totals = stats[:BLEU_ORDER], stats[BLEU_ORDER : 2 * BLEU_ORDER]
    hyp_len, ref_len = stats[-2:]
    if not any(matches):
        return 0.0
    log_precisions, smooth = [], 1.0
    for match, total in zip(matches, totals, strict=True):
        if total == 0:  # no n-grams of this order at all: BLEU is 0
            return 0.0
        if match == 0:
            smooth *= 2
            log_precisions.append(math.log(1 / (smooth * total)))
        else:
            log_precisions.append(math.log(match / total))
    brevity = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    return 100 * brevity * math.exp(sum(log_precisions) / BLEU_ORDER)


def chrf_statistics(hypothesis: str, reference: str) -> list[float]:
    """[hypothesis n-grams, reference n-grams, matches] for character orders 1..6, whitespace removed."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    stats = []
    for n in range(1, CHAR_ORDER + 1):
        h, r = ngrams(hyp, n), ngrams(ref, n)
        matches = sum(min(count, r[g]) for g, count in h.items())
        stats += [sum(h.values()) if r else 0, sum(r.values()), matches]  # sacreBLEU: no hits without a reference
    return stats


def chrf_score(stats: list[float], beta: float = CHRF_BETA) -> float:
    """Corpus chrF (0-100) from summed `chrf_statistics`: F-beta of the precision and recall averaged over the
    orders both sides have."""
    precision = recall = 0.0
    orders = 0
    for i in range(CHAR_ORDER):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        if n_hyp > 0 and n_ref > 0:
            precision, recall, orders = precision + n_match / n_hyp, recall + n_match / n_ref, orders + 1
    if orders == 0 or precision + recall == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    factor = beta**2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


class CorpusStatistics(Metric):
    """Sums per-sentence statistics (`statistics(hyp, ref)`) and scores them once (`score(sums)`)."""

    full_state_update = False
    size = 0

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sums", torch.zeros(self.size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        rows = [self.statistics(p, r) for p, r in zip(predictions, references, strict=True)]
        if rows:
            self.sums += torch.tensor(rows, dtype=torch.float64, device=self.sums.device).sum(dim=0)

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.score(self.sums.tolist()))


class SacreBLEU(CorpusStatistics):
    size = 2 * BLEU_ORDER + 2
    statistics, score = staticmethod(bleu_statistics), staticmethod(bleu_score)


class CHRF(CorpusStatistics):
    size = 3 * CHAR_ORDER
    statistics, score = staticmethod(chrf_statistics), staticmethod(chrf_score)


class ROUGE(ROUGEScore):
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-100), averaged over sentences."""

    def __init__(self) -> None:
        super().__init__(rouge_keys=("rouge1", "rouge2", "rougeL"))

    def compute(self) -> dict[str, torch.Tensor]:
        scores = super().compute()
        return {key: 100 * scores[f"{key}_fmeasure"] for key in ("rouge1", "rouge2", "rougeL")}


def generation_metrics(split: str) -> MetricCollection:
    """`<split>/bleu`, `<split>/chrf`, `<split>/rouge1`, `<split>/rouge2`, `<split>/rougeL`; update(predictions,
    references) with lists of strings."""
    return MetricCollection({"bleu": SacreBLEU(), "chrf": CHRF(), "rouge": ROUGE()}, prefix=f"{split}/",
                            compute_groups=False)
