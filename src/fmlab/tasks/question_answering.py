"""Extractive question answering (SQuAD v1.1 / v2.0) on any backbone: a start / end logit per token (Hugging Face's
`...ForQuestionAnswering` head, so it exports as one), fine-tuned by fmlab/tasks/finetune.py; windows of a question
are gathered back into one answer (n-best spans, `max_answer_length`, v2's null answer) scored by SQuAD's exact
match and F1 (fmlab/tasks/squad_metrics.py).

Several processes (DDP): every window's best span is a row of tensor states of `SpanCandidates`, a torchmetrics
metric that concatenates them from every process at `compute`, so each process holds every window of every question
before it picks answers (a question's windows may sit on different processes). The duplicated windows a
distributed sampler pads with change nothing: a question keeps its best span and its lowest null score.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from fmlab.errors import UserError, check_count
from fmlab.models.transformer import num_params
from fmlab.tasks.finetune import FinetuneTask
from fmlab.tasks.squad_metrics import best_null_threshold, score, squad_scores


class SpanAccuracy(Metric):
    """Share of windows whose predicted start and end token are both the target ones (position 0: no answer)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += (preds == targets).all(dim=-1).sum()
        self.total += targets.size(0)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def answer_mask(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(B, T) positions an answer may start or end at: the context tokens, and position 0 (no answer)."""
    if "offset_mapping" in batch:
        allowed = batch["offset_mapping"][..., 0] >= 0
    elif "attention_mask" in batch:
        allowed = batch["attention_mask"].bool()
    else:
        allowed = torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    allowed = allowed.clone()
    allowed[:, 0] = True
    return allowed


class SpanHead(nn.Module):
    """`qa_outputs`: a linear layer to (start, end) logits per token, Hugging Face's layout (`[..., 0]` start,
    `[..., 1]` end); the loss is the mean of the start and end cross-entropies over the positions allowed."""

    hf_head = ("ForQuestionAnswering", "qa_outputs")  # what export writes it as (fmlab/interop/export.py)

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.qa_outputs = nn.Linear(n_embd, 2)
        nn.init.normal_(self.qa_outputs.weight, std=0.02)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qa_outputs(hidden)

    def outputs(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, 2) logits, question, special and padding positions (but 0) at the lowest float."""
        logits = self(hidden).float()
        allowed = answer_mask(batch, logits)
        return logits.masked_fill(~allowed.unsqueeze(-1), torch.finfo(logits.dtype).min)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        start = F.cross_entropy(outputs[..., 0], batch["start_positions"])
        end = F.cross_entropy(outputs[..., 1], batch["end_positions"])
        return (start + end) / 2

    def predictions(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) argmax start / end tokens and (B, 2) targets."""
        targets = torch.stack([batch["start_positions"], batch["end_positions"]], dim=-1)
        return outputs.argmax(dim=1), targets

    def metrics(self, split: str) -> MetricCollection:
        return MetricCollection({"span_acc": SpanAccuracy()}, prefix=f"{split}/")


def best_window_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: torch.Tensor, n_best: int, max_answer_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window (B, T logits, (B, T, 2) character offsets, -1 off the context): the best span among the `n_best`
    highest start and end logits of its context tokens with end >= start and at most `max_answer_length` tokens, as
    (start char, end char, start + end logit; -inf where none is valid), and the null score (position 0)."""
    context = offsets[..., 0] >= 0
    k = min(n_best, start_logits.size(1))
    s_val, s_idx = start_logits.masked_fill(~context, -math.inf).topk(k, dim=1)  # (B, k)
    e_val, e_idx = end_logits.masked_fill(~context, -math.inf).topk(k, dim=1)
    length = e_idx.unsqueeze(1) - s_idx.unsqueeze(2)  # (B, k start, k end)
    valid = (length >= 0) & (length < max_answer_length)
    scores = (s_val.unsqueeze(2) + e_val.unsqueeze(1)).masked_fill(~valid, -math.inf).flatten(1)
    best, flat = scores.max(dim=1)
    start_tok = s_idx.gather(1, (flat // k).unsqueeze(1))
    end_tok = e_idx.gather(1, (flat % k).unsqueeze(1))
    start_char = offsets[..., 0].gather(1, start_tok).squeeze(1)
    end_char = offsets[..., 1].gather(1, end_tok).squeeze(1)
    return start_char, end_char, best, start_logits[:, 0] + end_logits[:, 0]


class SpanCandidates(Metric):
    """Every window's best span and null score, with its question index; concatenated over processes at compute
    (the module docstring says why)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("example", "start", "end", "score", "null"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, example: torch.Tensor, start: torch.Tensor, end: torch.Tensor, score: torch.Tensor,
               null: torch.Tensor) -> None:
        self.example.append(example)
        self.start.append(start)
        self.end.append(end)
        self.score.append(score.float())
        self.null.append(null.float())

    def compute(self) -> dict[str, np.ndarray]:
        names = ("example", "start", "end", "score", "null")
        return {n: dim_zero_cat(getattr(self, n)).cpu().numpy() for n in names}


def best_per_question(example: np.ndarray, start: np.ndarray, end: np.ndarray, score: np.ndarray,
                      null: np.ndarray) -> dict[int, tuple[int, int, float, float]]:
    """Question index -> (start char, end char, score) of its best span over its windows, and its lowest null
    score (Hugging Face run_qa's choice: the window most sure there is an answer speaks for the question)."""
    out: dict[int, tuple[int, int, float, float]] = {}
    for n, s, e, span, nil in zip(example.tolist(), start.tolist(), end.tolist(), score.tolist(), null.tolist(),
                                  strict=True):
        prev = out.get(n)
        if prev is None:
            out[n] = (s, e, span, nil)
        else:
            best = (s, e, span) if span > prev[2] else prev[:3]
            out[n] = (*best, min(nil, prev[3]))
    return out


class QuestionAnsweringTask(FinetuneTask):
    """Logs `*/loss` and `*/span_acc` (windows with both tokens right), and `val/` and `test/` `exact_match` and
    `f1` (0-100, SQuAD's); with unanswerable questions (v2) also `has_ans_f1`, `no_ans_f1`, and `best_f1` with the
    `best_f1_threshold` that reaches it (a `null_threshold` to use). At test, `test_report["predictions"]` maps
    each question id to its answer ("" for no answer)."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        max_answer_length: int = 30,
        n_best: int = 20,
        null_threshold: float = 0.0,
        version_2_with_negative: bool | None = None,
        has_unanswerable: bool = False,
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, finetune_mode, layer_decay, lora, drop_path)
        check_count("task.max_answer_length", max_answer_length)
        check_count("task.n_best", n_best)
        if version_2_with_negative not in (None, True, False):
            raise UserError(f"task.version_2_with_negative={version_2_with_negative}: choose true, false or null")
        if isinstance(null_threshold, bool) or not isinstance(null_threshold, int | float):
            raise UserError(f"task.null_threshold={null_threshold}: must be a number (a score difference)")
        if version_2_with_negative is False and has_unanswerable:
            raise UserError("task.version_2_with_negative=false, but the data holds unanswerable questions; set it "
                            "true (or null: it follows the data)")
        v2 = has_unanswerable if version_2_with_negative is None else version_2_with_negative
        self.save_hyperparameters({
            **self.hparams, "max_answer_length": max_answer_length, "n_best": n_best,
            "null_threshold": float(null_threshold), "version_2_with_negative": v2,
            "has_unanswerable": has_unanswerable,
        })
        self.max_answer_length, self.n_best = max_answer_length, n_best
        self.null_threshold, self.v2 = float(null_threshold), v2
        self.head = SpanHead(self.model.width)
        self.init_metrics()
        self.candidates = nn.ModuleDict({s: SpanCandidates() for s in ("val", "test")})
        self.test_report: dict = {}

    def eval_step(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared loss and span accuracy, and each window's best span for the answers at epoch end."""
        outputs = self(batch)
        preds, targets = self.head.predictions(outputs, batch)
        self.loss_meters[split].update(self.head.loss(outputs, batch), weight=targets.size(0))
        self.metrics[f"{split}_metrics"].update(preds, targets)
        spans = best_window_spans(outputs[..., 0], outputs[..., 1], batch["offset_mapping"], self.n_best,
                                  self.max_answer_length)
        self.candidates[split].update(batch["example_index"], *spans)
        return preds, targets

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.candidates["val"].reset()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.candidates["test"].reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_answers("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.test_report = {"predictions": self.log_answers("test")}

    def questions(self, split: str) -> dict:
        """The split's question table (ids, contexts, gold answers) from its loader's dataset
        (fmlab/data/squad.py); every process holds all of it."""
        loaders = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        table = getattr(getattr(loader, "dataset", None), "examples", None)
        if table is None:
            raise UserError(f"task=question_answering: the {split} data has no question table; use "
                            "data._target_=fmlab.data.squad.QuestionAnsweringDataModule")
        return table

    def answers(self, split: str) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
        """(answers, best span texts, null score - best span score) per question id of the windows seen."""
        table = self.questions(split)
        answers, spans, diffs = {}, {}, {}
        for n, (s, e, span, null) in best_per_question(**self.candidates[split].compute()).items():
            qid = table["ids"][n]
            spans[qid] = table["contexts"][table["context_of"][n]][s:e] if span > -math.inf else ""
            diffs[qid] = null - span
            answers[qid] = "" if self.v2 and diffs[qid] > self.null_threshold else spans[qid]
        return answers, spans, diffs

    def log_answers(self, split: str) -> dict[str, str]:
        """Log the split's SQuAD scores; returns its answers."""
        if self.candidates[split].update_count == 0:
            return {}
        answers, spans, diffs = self.answers(split)
        table = self.questions(split)
        golds = {qid: table["answers"][n] for n, qid in enumerate(table["ids"]) if qid in answers}
        scores = squad_scores(golds, answers)
        if self.v2:
            ids = list(answers)
            span_f1 = np.array([score(golds[q], spans[q])[1] for q in ids])
            null_f1 = np.array([score(golds[q], "")[1] for q in ids])
            threshold, best = best_null_threshold(np.array([diffs[q] for q in ids]), span_f1, null_f1)
            scores.update(best_f1=best, best_f1_threshold=threshold)
        # Every process computed the same scores from every window; sync_dist averages equal values (and keeps
        # Lightning from warning about epoch-level values logged unsynced).
        self.log_dict({f"{split}/{k}": float(v) for k, v in scores.items()}, sync_dist=True)
        return answers

    def flops_per_sample(self, seq_len: int | None = None) -> float:
        """`encode` plus the head, which runs on every position (6 FLOPs per weight and position)."""
        positions = self.model.sequence_length() if seq_len is None else seq_len
        return self.model.encode_flops(seq_len) + 6 * num_params(self.head) * positions
