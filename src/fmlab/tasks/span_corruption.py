"""T5's span corruption (Raffel et al. 2020, section 3.1.4): in each packed window, spans covering `noise_density`
of the tokens (mean length `mean_span_length`) are each replaced by one sentinel; the decoder predicts the sentinels
followed by the tokens they replaced. As T5's `random_spans_noise_mask`, a window starts with kept tokens and ends
with a dropped span, so `<s0> span0 <s1> span1 ... <s_n-1> span_n-1 EOS` are the targets and
`kept0 <s0> kept1 <s1> ... kept_n-1 <s_n-1> EOS` the inputs; every window of a batch has the same lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torchmetrics import MeanMetric

from fmlab.data.span_corpus import sentinel_ids
from fmlab.data.tokenizer import EOS, find_token
from fmlab.errors import UserError
from fmlab.tasks.base import Task

EOS_TOKENS = (EOS, "</s>")  # ours, and T5's


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a window of `length` tokens, rounded as T5 rounds them."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_span_length), 1), length - noise)
    return noise, spans


def random_segmentation(
    batch: int, items: int, segments: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(batch, segments) lengths, each at least 1, summing to `items`: a uniform random composition per row."""
    cuts = torch.rand(batch, items - 1, generator=generator, device=device).argsort(dim=1)[:, : segments - 1]
    first = torch.zeros(batch, items, dtype=torch.long, device=device).scatter_(1, cuts + 1, 1)
    lengths = torch.zeros(batch, segments, dtype=torch.long, device=device)
    return lengths.scatter_add_(1, first.cumsum(dim=1), torch.ones_like(first))


def random_spans_noise_mask(
    batch: int, length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(batch, length) bool, True = dropped: kept and dropped spans alternate, kept first, dropped last."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    noise_lengths = random_segmentation(batch, noise, spans, generator, torch.device(device))
    kept_lengths = random_segmentation(batch, length - noise, spans, generator, torch.device(device))
    interleaved = torch.stack([kept_lengths, noise_lengths], dim=2).view(batch, 2 * spans)
    starts = interleaved.cumsum(dim=1)[:, :-1]  # where spans 1 .. 2 spans - 1 begin
    span_index = torch.zeros(batch, length, dtype=torch.long, device=device).scatter_(1, starts, 1).cumsum(dim=1)
    return span_index % 2 == 1


def collapse_spans(ids: torch.Tensor, span_mask: torch.Tensor, sentinels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each run of True in `span_mask` -> one sentinel (the i-th run: sentinels[i]), other tokens kept, EOS appended.
    Every row must have the same number of runs and kept tokens (as the noise mask gives)."""
    previous = F.pad(span_mask[:, :-1], (1, 0), value=False)
    run_start = span_mask & ~previous
    run_index = (run_start.long().cumsum(dim=1) - 1).clamp(min=0)
    replaced = torch.where(run_start, sentinels[run_index], ids)
    kept = replaced[~span_mask | run_start].view(ids.size(0), -1)
    return torch.cat([kept, kept.new_full((ids.size(0), 1), eos_id)], dim=1)


def corrupt_spans(
    ids: torch.Tensor, sentinels: torch.Tensor, eos_id: int, noise_density: float = 0.15,
    mean_span_length: float = 3.0, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (B, L) -> (encoder inputs, decoder targets) of span corruption (see the module docstring)."""
    B, L = ids.shape
    _, spans = span_counts(L, noise_density, mean_span_length)
    if spans > len(sentinels):
        raise UserError(f"a window of {L} tokens has {spans} noise spans but the tokenizer has {len(sentinels)} "
                        "sentinels: raise data.num_sentinels or lower data.block_size")
    noise = random_spans_noise_mask(B, L, noise_density, mean_span_length, generator, ids.device)
    return collapse_spans(ids, noise, sentinels, eos_id), collapse_spans(ids, ~noise, sentinels, eos_id)


class SpanCorruptionTask(Task):
    """Decoder cross-entropy on the span-corruption targets of packed windows (fmlab/data/span_corpus.py); logs
    `train/loss`, `val/loss`, `val/ppl` (per target token) and `val/acc` (teacher-forced next-token accuracy)."""

    def __init__(
        self, model: dict, optimizer: dict, scheduler: dict, noise_density: float = 0.15, mean_span_length: float = 3.0
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        if not 0 < noise_density < 1:
            raise UserError(f"task.noise_density={noise_density} must be in (0, 1)")
        if mean_span_length < 1:
            raise UserError(f"task.mean_span_length={mean_span_length} must be at least 1")
        self.save_hyperparameters({**self.hparams, "noise_density": noise_density,
                                   "mean_span_length": mean_span_length})
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self._tokens: dict | None = None

    def tokens(self) -> dict:
        """Sentinel ids and EOS from the run's tokenizer (extra_state), read once."""
        if self._tokens is None:
            if "tokenizer" not in self.extra_state:
                raise ValueError("SpanCorruptionTask needs the tokenizer in extra_state (set by the data module)")
            tok = Tokenizer.from_str(self.extra_state["tokenizer"])
            eos = find_token(tok, EOS_TOKENS)
            if eos is None:
                raise UserError(f"the tokenizer has no end-of-sequence token (one of {EOS_TOKENS})")
            self._tokens = {"sentinels": torch.tensor(sentinel_ids(tok), device=self.device), "eos": eos}
        return self._tokens

    def lengths(self, window: int | None = None) -> tuple[int, int]:
        """(encoder, decoder) positions per window of `window` tokens (default the model's block_size)."""
        window = window or self.model.config.block_size
        noise, spans = span_counts(window, self.noise_density, self.mean_span_length)
        return window - noise + spans + 1, noise + spans + 1

    def step(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        t = self.tokens()
        ids = batch[:, : self.model.config.block_size]  # windows carry one extra token for the causal shift
        inputs, targets = corrupt_spans(ids, t["sentinels"], t["eos"], self.noise_density, self.mean_span_length,
                                        generator)
        logits = self.model(inputs, self.model.shift_right(targets)).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, (logits.argmax(dim=-1) == targets).float().mean(), targets.numel()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()
        self.val_acc.reset()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # The same spans at every evaluation, so validation losses compare across steps.
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)
        loss, acc, n = self.step(batch, generator)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(acc, weight=n)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log_eval("val")

    def on_test_epoch_end(self) -> None:
        self.log_eval("test")

    def log_eval(self, split: str) -> None:
        loss = self.val_loss.compute()
        self.log_loss_and_ppl(split, loss)
        self.log(f"{split}/acc", self.val_acc.compute())

    def flops_per_sample(self) -> float:
        """Training FLOPs of one window: the encoder over the corrupted input, the decoder over the targets."""
        return self.model.seq2seq_flops(*self.lengths())

    def tokens_per_sample(self) -> int:
        """Tokens of the original window one sample stands for."""
        return self.model.config.block_size
