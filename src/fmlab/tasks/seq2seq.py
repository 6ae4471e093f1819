"""Seq2seq fine-tuning (translation, summarisation) of an encoder-decoder (T5) on text pairs
(fmlab/data/text_pairs.py): teacher-forced cross-entropy (optionally label-smoothed), generation at validation (the
first `generate_val_batches` batches) and test (every batch), scored with BLEU, chrF and ROUGE
(fmlab/tasks/text_metrics.py); the test predictions go into the run's test report.

The fine-tuning modes and layer decay come from fmlab/tasks/finetune.py. Seq2seq's head is the decoder: `full`
trains everything, `linear_probe` freezes the encoder (and the shared embedding) and trains the decoder, `lora`
adapts both stacks' projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torchmetrics import MeanMetric

from fmlab.data.tokenizer import EOS, find_token
from fmlab.errors import UserError, check_choice, check_count
from fmlab.models.lora import add_lora
from fmlab.tasks.finetune import FINETUNE_MODES, FinetuneTask
from fmlab.tasks.text_metrics import generation_metrics

SOURCE_CHARS = 300  # of each source in the test report
EOS_TOKENS = (EOS, "</s>")  # ours, and T5's
EVAL_SPLITS = ("val", "test")


class Seq2seqTask(FinetuneTask):
    """Logs `train/loss` (label-smoothed when asked), `<split>/loss` and `<split>/ppl` (plain cross-entropy per
    target token) and `<split>/bleu`, `chrf`, `rouge1`, `rouge2`, `rougeL` (0-100) of generated text for val and
    test. Generation: greedy, or beam search with `num_beams` > 1 and `length_penalty`."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        label_smoothing: float = 0.0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int = 64,
        generate_val_batches: int | None = 2,
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        check_choice("task.finetune_mode", finetune_mode, FINETUNE_MODES)
        super().__init__(model, optimizer, scheduler, "full", layer_decay, lora, drop_path)  # the mode: below
        if not getattr(self.model, "is_encoder_decoder", False):
            raise UserError(f"task=seq2seq needs an encoder-decoder model (model=t5), not {type(self.model).__name__}")
        if self.model.decoder is None:
            # FinetuneTask strips the pre-training heads, and T5's decoder is one; seq2seq fine-tunes it (its
            # pretrained weights load after this).
            self.model.build_decoder()
        if not 0 <= label_smoothing < 1:
            raise UserError(f"task.label_smoothing={label_smoothing} must be in [0, 1)")
        check_count("task.num_beams", num_beams)
        check_count("task.max_new_tokens", max_new_tokens)
        if generate_val_batches is not None and generate_val_batches < 0:
            raise UserError(f"task.generate_val_batches={generate_val_batches}: 0 or more, or null for every batch")
        self.save_hyperparameters({**self.hparams, "finetune_mode": finetune_mode, "label_smoothing": label_smoothing,
                                   "num_beams": num_beams, "length_penalty": length_penalty,
                                   "max_new_tokens": max_new_tokens, "generate_val_batches": generate_val_batches})
        self.finetune_mode, self.label_smoothing = finetune_mode, label_smoothing
        self.num_beams, self.length_penalty, self.max_new_tokens = num_beams, length_penalty, max_new_tokens
        self.generate_val_batches = generate_val_batches
        if finetune_mode == "linear_probe":
            self.model.requires_grad_(False)
            self.model.decoder.requires_grad_(True)
            if self.model.lm_head is not None:
                self.model.lm_head.requires_grad_(True)
        elif finetune_mode == "lora":
            lora = self.hparams["lora"]
            add_lora(self.model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
        self.loss_meters = nn.ModuleDict({s: MeanMetric() for s in EVAL_SPLITS})
        self.metrics = nn.ModuleDict({f"{s}_metrics": generation_metrics(s) for s in EVAL_SPLITS})
        self.generated = {s: 0 for s in EVAL_SPLITS}
        self.predictions: list[dict[str, str]] = []
        self.test_report: dict = {}
        self._tokenizer: Tokenizer | None = None

    def train(self, mode: bool = True) -> Seq2seqTask:
        super(FinetuneTask, self).train(mode)  # not FinetuneTask's: a linear probe here trains the decoder
        if mode and self.finetune_mode == "linear_probe":
            self.model.encoder.eval()
        return self

    # ---- text ---------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if "tokenizer" not in self.extra_state:
                raise ValueError("Seq2seqTask needs the tokenizer in extra_state (set by the data module)")
            self._tokenizer = Tokenizer.from_str(self.extra_state["tokenizer"])
        return self._tokenizer

    @property
    def eos_id(self) -> int | None:
        return find_token(self.tokenizer, EOS_TOKENS)

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> text, up to the first EOS, special tokens left out."""
        eos = self.eos_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_text(self, batch: dict) -> list[str]:
        out = self.model.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens=self.max_new_tokens,
            strategy="beam" if self.num_beams > 1 else "greedy", num_beams=self.num_beams,
            length_penalty=self.length_penalty, eos_id=self.eos_id,
        )
        return [self.decode(row) for row in out.tolist()]

    # ---- steps --------------------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) of the batch's targets."""
        decoder_inputs = self.model.shift_right(batch["labels"])
        return self.model(batch["input_ids"], decoder_inputs, batch["attention_mask"]).float()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch["labels"], self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log_lr()
        return loss

    def eval_step(self, batch: dict, split: str, generate: bool) -> list[str] | None:
        labels = batch["labels"]
        self.loss_meters[split].update(self.loss(self(batch), labels), weight=int((labels != -100).sum()))
        if not generate:
            return None
        predictions = self.generate_text(batch)
        self.metrics[f"{split}_metrics"].update(predictions, batch["references"])
        self.generated[split] += len(predictions)
        return predictions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        limit = self.generate_val_batches
        self.eval_step(batch, "val", generate=limit is None or batch_idx < limit)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        predictions = self.eval_step(batch, "test", generate=True)
        for source, reference, prediction in zip(batch["sources"], batch["references"], predictions, strict=True):
            self.predictions.append({"source": source[:SOURCE_CHARS], "reference": reference,
                                     "prediction": prediction})

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.generated["val"] = 0

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.generated["test"], self.predictions = 0, []

    def log_eval(self, split: str) -> None:
        loss = self.loss_meters[split].compute()
        self.log_loss_and_ppl(split, loss, prog_bar_ppl=False)
        if self.generated[split]:
            self.log_dict(self.metrics[f"{split}_metrics"].compute(), prog_bar=True)
        self.metrics[f"{split}_metrics"].reset()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.test_report = {"generation": {"num_beams": self.num_beams, "length_penalty": self.length_penalty,
                                           "max_new_tokens": self.max_new_tokens},
                            "predictions": self.predictions}

    # ---- cost ---------------------------------------------------------------------------------------------------

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of this batch at its padded lengths (every weight counted as trained)."""
        ids, labels = batch["input_ids"], batch["labels"]
        return ids.size(0) * self.model.seq2seq_flops(ids.size(1), labels.size(1))

    def tokens_per_batch(self, batch: dict) -> int:
        return batch["input_ids"].numel() + batch["labels"].numel()
