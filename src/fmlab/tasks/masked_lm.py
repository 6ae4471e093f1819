"""Masked language modelling (BERT): dynamic masking per batch, loss on masked positions only, optional NSP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torchmetrics import MeanMetric

from fmlab.data.tokenizer import find_token, special_token_ids
from fmlab.errors import UserError
from fmlab.models.transformer import num_params
from fmlab.tasks.base import Task

MASK_TOKENS = ("<mask>", "[MASK]")


def word_continuation_table(tok: Tokenizer) -> torch.Tensor:
    """(V,) bool: the token continues the previous word (WordPiece `##x`; byte-level BPE: no leading space)."""
    table = torch.zeros(tok.get_vocab_size(), dtype=torch.bool)
    wordpiece = type(tok.model).__name__ == "WordPiece"
    for token, idx in tok.get_vocab().items():
        table[idx] = token.startswith("##") if wordpiece else not token.startswith(("Ġ", "Ċ"))
    table[special_token_ids(tok)] = False
    return table


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    special: torch.Tensor,
    vocab_size: int,
    mask_prob: float = 0.15,
    continuation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking -> (inputs, targets). `special` (V,) bool marks ids never masked. Of the chosen positions,
    80 % become the mask token, 10 % a random token, 10 % stay; targets are -100 elsewhere. With a
    `continuation` table (V,) the choice is per word: all pieces of a word are masked together."""
    device = input_ids.device
    rand = torch.rand(input_ids.shape, generator=generator, device=device)
    maskable = ~special[input_ids]
    if continuation is not None:
        # Every piece of a word reads the random draw of the word's first piece.
        starts = ~continuation[input_ids] | ~maskable
        word = starts.long().cumsum(dim=1) - 1
        rand = rand.gather(1, word.clamp(min=0))
    chosen = (rand < mask_prob) & maskable
    targets = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    inputs = input_ids.clone()
    inputs[chosen & (action < 0.8)] = mask_token_id
    randomise = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    inputs[randomise] = random_ids[randomise]
    return inputs, targets


class MaskedLMTask(Task):
    """Logs `train/loss`, `val/loss`, `val/ppl` (of the masked tokens), `val/mlm_acc`, and `*/nsp_acc` with NSP.

    Batches are packed token windows (B, block_size + 1) from TextCorpusDataModule; the first block_size
    tokens are used. The tokenizer (from the checkpointed extra state) gives the mask and special tokens.
    """

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        mask_prob: float = 0.15,
        whole_word_mask: bool = False,
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        if not 0 < mask_prob < 1:
            raise UserError(f"task.mask_prob={mask_prob} must be in (0, 1)")
        self.save_hyperparameters({**self.hparams, "mask_prob": mask_prob, "whole_word_mask": whole_word_mask})
        self.mask_prob, self.whole_word_mask = mask_prob, whole_word_mask
        self.nsp = bool(getattr(self.model.config, "nsp", False))
        self.val_loss, self.val_acc, self.val_nsp_acc = MeanMetric(), MeanMetric(), MeanMetric()
        self._tokens: dict | None = None

    def tokens(self) -> dict:
        """Mask id, special-token table and word table from the run's tokenizer, built once."""
        if self._tokens is None:
            if "tokenizer" not in self.extra_state:
                raise ValueError("MaskedLMTask needs the tokenizer in extra_state (set by the data module)")
            tok = Tokenizer.from_str(self.extra_state["tokenizer"])
            mask_id = find_token(tok, MASK_TOKENS)
            if mask_id is None:
                raise UserError(f"the tokenizer has no mask token (one of {MASK_TOKENS})")
            special = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
            special[special_token_ids(tok)] = True
            self._tokens = {
                "mask_id": mask_id,
                "special": special.to(self.device),
                "continuation": word_continuation_table(tok).to(self.device) if self.whole_word_mask else None,
                "cls_id": find_token(tok, ("<cls>", "[CLS]")),
                "sep_id": find_token(tok, ("<sep>", "[SEP]")),
            }
        return self._tokens

    def step(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        t = self.tokens()
        ids = batch[:, : self.model.config.block_size]  # windows carry one extra token for the causal shift
        token_type_ids, nsp_labels = None, None
        if self.nsp:
            ids, token_type_ids, nsp_labels = self.sentence_pairs(ids, generator)
        inputs, targets = mask_tokens(
            ids, t["mask_id"], t["special"], self.model.config.vocab_size, self.mask_prob, t["continuation"], generator
        )
        hidden = self.model.encode(inputs, token_type_ids=token_type_ids)
        selected = targets != -100
        logits = self.model.mlm_head(hidden[selected]).float()
        out = {"loss": F.cross_entropy(logits, targets[selected]) if selected.any() else logits.sum() * 0.0}
        out["mlm_loss"] = out["loss"]
        out["mlm_acc"] = (logits.argmax(-1) == targets[selected]).float().mean() if selected.any() else None
        out["n_masked"] = int(selected.sum())
        if self.nsp:
            nsp_logits = self.model.nsp_logits(hidden).float()
            out["loss"] = out["loss"] + F.cross_entropy(nsp_logits, nsp_labels)
            out["nsp_acc"] = (nsp_logits.argmax(-1) == nsp_labels).float().mean()
        return out

    def flops_per_sample(self, masked: float | None = None) -> float:
        """Training FLOPs of one window: the encoder at every position (block_size; one or two fewer with NSP), the
        MLM head (dense, norm and the tied vocabulary projection) only at the `masked` ones (default the expected
        mask_prob share: `step` projects no other position), and NSP's pooler and classifier once, at [CLS]."""
        T = self.model.config.block_size
        if self.nsp:
            T = 2 * ((T - 3) // 2) + 3  # `sentence_pairs`: [CLS] A [SEP] B [SEP] from two equal halves
        masked = self.mask_prob * T if masked is None else masked
        heads = 6 * num_params(self.model.mlm_head) * masked  # every head weight trains, the decoder is wte
        if self.nsp:
            heads += 6 * (num_params(self.model.pooler) + num_params(self.model.nsp_head))
        return self.model.encode_flops(T) + heads

    def sentence_pairs(self, ids: torch.Tensor, generator: torch.Generator | None) -> tuple:
        """[CLS] A [SEP] B [SEP] from each window's halves; half the B segments come from another window
        (NotNext, label 1), the rest are the true continuation (IsNext, label 0)."""
        t = self.tokens()
        if t["cls_id"] is None or t["sep_id"] is None:
            raise UserError("NSP needs <cls>/<sep> (or [CLS]/[SEP]) tokens in the tokenizer")
        B, T = ids.shape
        half = (T - 3) // 2
        a, b = ids[:, :half], ids[:, half : 2 * half]
        not_next = torch.rand(B, generator=generator, device=ids.device) < 0.5
        b = torch.where(not_next[:, None], b.roll(1, dims=0), b) if B > 1 else b
        col = ids.new_full((B, 1), 0)
        seq = torch.cat([col + t["cls_id"], a, col + t["sep_id"], b, col + t["sep_id"]], dim=1)
        types = torch.cat([torch.zeros(B, half + 2, dtype=torch.long), torch.ones(B, half + 1, dtype=torch.long)], 1)
        return seq, types.to(ids.device), (not_next & (B > 1)).long()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        if self.nsp:
            self.log("train/nsp_acc", out["nsp_acc"])
        self.log_lr()
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_loss, self.val_acc, self.val_nsp_acc):
            metric.reset()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # The same masks at every evaluation, so validation losses compare across steps.
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)
        out = self.step(batch, generator)
        if out["n_masked"]:
            self.val_loss.update(out["mlm_loss"], weight=out["n_masked"])
            self.val_acc.update(out["mlm_acc"], weight=out["n_masked"])
        if self.nsp:
            self.val_nsp_acc.update(out["nsp_acc"], weight=batch.size(0))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log_eval("val")

    def on_test_epoch_end(self) -> None:
        self.log_eval("test")

    def log_eval(self, split: str) -> None:
        loss = self.val_loss.compute()
        self.log_loss_and_ppl(split, loss)
        self.log(f"{split}/mlm_acc", self.val_acc.compute())
        if self.nsp:
            self.log(f"{split}/nsp_acc", self.val_nsp_acc.compute())
