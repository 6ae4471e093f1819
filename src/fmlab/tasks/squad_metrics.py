"""SQuAD's exact match and F1 as the official v2.0 evaluation script defines them (v1.1 scores are the same for
answerable questions), and the null-answer threshold that maximises F1 (its `find_best_thresh`).

Normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace. A question's score is
the max over its gold answers; an unanswerable question's only gold answer is the empty string. Scores are 0-100.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(gold: str, prediction: str) -> float:
    """Token-overlap F1 of the normalised answers; 1 when both are empty (no answer), 0 when only one is."""
    gold_toks, pred_toks = answer_tokens(gold), answer_tokens(prediction)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: list[str]) -> list[str]:
    """The answers that normalise to something; `[""]` (no answer) when none does, as the official script."""
    return [a for a in answers if normalize_answer(a)] or [""]


def score(golds: list[str], prediction: str) -> tuple[float, float]:
    """(exact match, F1) of one prediction, each the max over the gold answers, in 0-1."""
    golds = gold_answers(golds)
    return max(exact_match(g, prediction) for g in golds), max(f1_score(g, prediction) for g in golds)


def squad_scores(golds: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """`exact_match` and `f1` (0-100) over the questions in `predictions`; with unanswerable questions among them,
    also `has_ans_f1` and `no_ans_f1` (the official HasAns / NoAns breakdown)."""
    if not predictions:
        return {}
    per = {qid: score(golds[qid], text) for qid, text in predictions.items()}
    out = {
        "exact_match": 100.0 * float(np.mean([em for em, _ in per.values()])),
        "f1": 100.0 * float(np.mean([f1 for _, f1 in per.values()])),
    }
    no_answer = {qid for qid in predictions if gold_answers(golds[qid]) == [""]}
    if no_answer:
        has = [per[q][1] for q in per if q not in no_answer]
        out["has_ans_f1"] = 100.0 * float(np.mean(has)) if has else 0.0
        out["no_ans_f1"] = 100.0 * float(np.mean([per[q][1] for q in no_answer]))
    return out


def best_null_threshold(null_minus_span: np.ndarray, span_f1: np.ndarray, null_f1: np.ndarray) -> tuple[float, float]:
    """The `null_threshold` (predict no answer where null score - best span score > threshold) that maximises the
    mean F1, and that F1 (0-100). Per question: its score difference, the F1 of its best span and of "no answer"."""
    order = np.argsort(null_minus_span, kind="stable")
    diffs = null_minus_span[order]
    # Threshold diffs[k]: the questions up to k answer with their span, the rest say "no answer"; entry 0 is a
    # threshold below every difference (always "no answer"). Within a run of equal differences only its end counts.
    totals = np.concatenate([[0.0], np.cumsum(span_f1[order])]) + null_f1.sum() - np.concatenate(
        [[0.0], np.cumsum(null_f1[order])])
    ends = np.concatenate([[True], np.append(diffs[1:] != diffs[:-1], True)])
    best = int(np.argmax(np.where(ends, totals, -np.inf)))
    threshold = float(diffs[best - 1]) if best > 0 else float(diffs[0]) - 1.0
    if not np.isfinite(threshold):  # questions without any valid span say "no answer" at every threshold
        finite = diffs[np.isfinite(diffs)]
        threshold = float(finite.max()) if finite.size else 0.0
    return threshold, 100.0 * float(totals[best]) / len(diffs)
