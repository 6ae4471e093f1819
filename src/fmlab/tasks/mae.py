"""Masked autoencoding (He et al. 2021): encode a random 25% of the patches, reconstruct the pixels of the rest.

The ViT encoder sees visible patches only; a light decoder of its own width and depth fills in mask tokens and
predicts every patch's pixels; the loss is the mean squared error on the masked patches. A fixed validation batch
is drawn as original / masked / reconstruction every `image_log_interval` validations.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torchmetrics import MeanMetric
from torchvision.utils import make_grid, save_image

from fmlab.errors import UserError, check_count
from fmlab.models.mae_decoder import MAEDecoder, patchify, unpatchify
from fmlab.models.transformer import num_params, training_flops
from fmlab.tasks.base import Task, to_plain
from fmlab.tasks.figures import denormalize

log = logging.getLogger(__name__)


def random_masking(
    batch: int, n: int, mask_ratio: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking of `n` patches -> (ids_keep (B, n_keep), mask (B, n) with 1 = masked,
    ids_restore (B, n)). Exactly n - int(n * (1 - mask_ratio)) patches of every sample are masked."""
    n_keep = int(n * (1 - mask_ratio))
    if not 0 < n_keep <= n:
        raise UserError(f"mask_ratio={mask_ratio} leaves {n_keep} of {n} patches visible; keep at least one")
    noise = torch.rand(batch, n, generator=generator).to(device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first n_keep are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, n, device=device)
    mask[:, :n_keep] = 0
    return ids_shuffle[:, :n_keep], torch.gather(mask, 1, ids_restore), ids_restore


class MAETask(Task):
    """Masked autoencoder pre-training of a ViT; logs `train/loss`, `val/loss`, `lr` and reconstruction grids."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder: dict | None = None,
        image_log_interval: int = 1,
        num_images: int = 8,
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        if not all(hasattr(self.model, name) for name in ("embed", "encode_tokens", "num_patches")):
            raise UserError(f"masked autoencoding needs a patch-token backbone (embed, encode_tokens, num_patches, "
                             f"like ViT); {type(self.model).__name__} has none")
        # The decoder of the backbone's size (fmlab/models/vit.py presets), with the task's non-null keys on top.
        decoder = {**self.model.config.mae_decoder, **{k: v for k, v in (to_plain(decoder) or {}).items()
                                                        if v is not None}}
        for name, value in decoder.items():
            check_count(f"task.decoder.{name}", value)
        self.save_hyperparameters({
            **self.hparams, "mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss, "decoder": decoder,
            "image_log_interval": image_log_interval, "num_images": num_images,
        })
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.image_log_interval, self.num_images = image_log_interval, num_images
        self.decoder = MAEDecoder(self.model, **decoder)
        self.val_loss = MeanMetric()
        self.image_batch: torch.Tensor | None = None  # the fixed validation images drawn every few validations
        self.validations = 0

    def forward(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (loss, pixel predictions (B, N, p*p*C) in target units, mask (B, N) with 1 = masked)."""
        tokens = self.model.embed(pixel_values)  # (B, N, C)
        B, N, C = tokens.shape
        ids_keep, mask, ids_restore = random_masking(B, N, self.mask_ratio, tokens.device, generator)
        visible = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, C))
        pred = self.decoder(self.model.encode_tokens(visible), ids_restore).float()
        target = patchify(pixel_values.float(), self.model.config.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask

    sample_unit = "images"

    def flops_per_sample(self) -> float:
        """Training FLOPs of one image, each part at the positions it runs on: the patch embedding on all N patches
        (forward and weight gradient; pixels need no gradient), the encoder's blocks and the decoder's input
        projection on the visible patches + CLS, the decoder's blocks on all patches + CLS, its pixel predictor on
        the N patches."""
        vit, dec, n = self.model, self.decoder, self.model.num_patches
        visible = int(n * (1 - self.mask_ratio)) + 1  # as `random_masking` keeps them, plus CLS
        patch_embed = tuple(vit.patch_embed.parameters())
        encoder_blocks = num_params(vit, exclude=(vit.pos_embed, *patch_embed))
        dec_layers, dec_width = len(dec.transformer.blocks), dec.mask_token.shape[-1]
        return (
            4 * num_params(vit.patch_embed) * n
            + training_flops(encoder_blocks, vit.config.n_layer, vit.config.n_embd, visible)
            + 6 * num_params(dec.proj_in) * visible
            + training_flops(num_params(dec.transformer), dec_layers, dec_width, n + 1)
            + 6 * num_params(dec.pred) * n
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self(batch["pixel_values"])
        self.log("train/loss", loss, prog_bar=True)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The same masks every validation, so val/loss moves only with the model.
        loss, _, _ = self(batch["pixel_values"], torch.Generator().manual_seed(batch_idx))
        self.val_loss.update(loss, weight=batch["pixel_values"].size(0))
        if batch_idx == 0 and self.image_batch is None:
            self.image_batch = batch["pixel_values"][: self.num_images].detach().clone()

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        if self.image_batch is not None and self.image_log_interval > 0:
            if self.validations % self.image_log_interval == 0 and not self.trainer.sanity_checking:
                self.log_reconstructions()
            self.validations += 1

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.val_loss.compute())
        self.val_loss.reset()

    # ---- reconstruction grid --------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruction_grid(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) normalised images -> a (3, H', W') grid in [0, 1]: originals, masked, reconstructions."""
        cfg = self.model.config
        p, grid = cfg.patch_size, cfg.grid_size
        _, pred, mask = self(images, torch.Generator().manual_seed(0))
        target = patchify(images.float(), p)
        if self.norm_pix_loss:  # predictions are in per-patch normalised units: undo with the true patch stats
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        mask = mask[..., None]
        masked = unpatchify(target * (1 - mask), p, cfg.in_chans, grid)
        recon = unpatchify(target * (1 - mask) + pred * mask, p, cfg.in_chans, grid)
        stats = self.extra_state.get("normalization", {})
        rows = [denormalize(x, stats) for x in (images.float(), masked, recon)]
        rows[1] = torch.where(unpatchify(mask.expand_as(target), p, cfg.in_chans, grid).bool(), 0.5, rows[1])
        return make_grid(torch.cat(rows).cpu(), nrow=len(images), padding=1, pad_value=1.0)

    def log_reconstructions(self) -> None:
        """Draw the fixed validation batch: a PNG in the run folder, and an image in TensorBoard and W&B."""
        if not self.trainer.is_global_zero:
            return
        was_training = self.training
        self.eval()
        grid = self.reconstruction_grid(self.image_batch.to(self.device))
        self.train(was_training)
        step = self.global_step
        folder = Path(self.trainer.default_root_dir) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"step{step:06d}.png")
        for logger in self.loggers:
            kind = type(logger).__name__
            if kind == "TensorBoardLogger":
                logger.experiment.add_image("val/reconstruction", grid, step)
            elif kind == "WandbLogger":
                array = (grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                caption = ["original / masked / reconstruction"]
                logger.log_image("val/reconstruction", [array], step=step, caption=caption)
