"""Minimal reference models and a plain training loop: the floor fmlab's runs are measured against.

Written in the nanoGPT style: one file, a fused qkv projection, `F.scaled_dot_product_attention`, no config system,
no hooks. One model per benchmark shape:

- `RefGPT`: causal pre-LN decoder, no biases, exact GELU, tied embeddings, next-token cross-entropy;
- `RefBERT`: post-LN bidirectional encoder (BERT), an MLM head projecting the masked positions only (as fmlab's);
- `RefMAE`: a ViT encoder on the visible 25 % of the patches plus a light decoder (He et al. 2021).

`from_fmlab_*` copy an fmlab model's state dict into the reference model (the same initial weights), and
`reference_optimizer` builds the same AdamW groups and warm-up + cosine schedule as fmlab's tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool, causal: bool) -> None:
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool = False, causal: bool = True, pre_norm: bool = True,
                 eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps, bias=bias)
        self.attn = Attention(n_embd, n_head, bias, causal)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps, bias=bias)
        self.mlp = MLP(n_embd, 4 * n_embd, bias, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.ln_1(x)))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.dropout(self.attn(x)))  # post-LN (BERT)
        return self.ln_2(x + self.mlp(x))


class RefGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)


class RefBERT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, eps: float = 1e-12,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.wtt = nn.Embedding(2, n_embd)
        self.ln_e = nn.LayerNorm(n_embd, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, bias=True, causal=False, pre_norm=False, eps=eps,
                                     dropout=dropout) for _ in range(n_layer))
        self.head_dense = nn.Linear(n_embd, n_embd)
        self.head_ln = nn.LayerNorm(n_embd, eps=eps)
        self.decoder = nn.Linear(n_embd, vocab_size)
        self.decoder.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MLM loss; `targets` is -100 where nothing is predicted (only those positions reach the vocabulary)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device)) + self.wtt.weight[0]
        x = self.drop(self.ln_e(x))
        for block in self.h:
            x = block(x)
        selected = targets != -100
        logits = self.decoder(self.head_ln(F.gelu(self.head_dense(x[selected]))))
        return F.cross_entropy(logits.float(), targets[selected])


class RefMAE(nn.Module):
    """ViT encoder (patch conv, CLS, fixed position table) on the kept patches, decoder on all; normalized-pixel MSE
    on the masked patches."""

    def __init__(self, img_size: int, patch: int, chans: int, n_layer: int, n_head: int, n_embd: int,
                 dec_layer: int, dec_head: int, dec_embd: int, mask_ratio: float = 0.75, eps: float = 1e-6) -> None:
        super().__init__()
        self.patch, self.mask_ratio = patch, mask_ratio
        n = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(chans, n_embd, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.register_buffer("pos_embed", torch.zeros(1, n + 1, n_embd))
        self.blocks = nn.ModuleList(Block(n_embd, n_head, bias=True, causal=False, eps=eps) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, eps=eps)
        self.dec_embed = nn.Linear(n_embd, dec_embd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_embd))
        self.register_buffer("dec_pos_embed", torch.zeros(1, n + 1, dec_embd))
        self.dec_blocks = nn.ModuleList(Block(dec_embd, dec_head, bias=True, causal=False, eps=eps)
                                        for _ in range(dec_layer))
        self.dec_norm = nn.LayerNorm(dec_embd, eps=eps)
        self.dec_pred = nn.Linear(dec_embd, patch * patch * chans)

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        B, N, C = x.shape
        keep = int(N * (1 - self.mask_ratio))
        shuffle = torch.rand(B, N, generator=generator).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, C))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.dec_embed(self.norm(x))
        D = x.size(-1)
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, N - keep, -1).to(x.dtype)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, D))
        x = torch.cat([x[:, :1], patches], dim=1) + self.dec_pos_embed
        for block in self.dec_blocks:
            x = block(x)
        pred = self.dec_pred(self.dec_norm(x)[:, 1:]).float()
        p, c = self.patch, imgs.size(1)
        h, w = imgs.size(2) // p, imgs.size(3) // p
        target = imgs.float().reshape(B, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, N, p * p * c)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        mask = torch.ones(B, N)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


# ---- the same weights as an fmlab model ----------------------------------------------------------------------------

BLOCK_KEYS = {  # fmlab Block -> reference Block
    "ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2", "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}


def map_blocks(state: dict[str, torch.Tensor], ours: str, theirs: str) -> dict[str, torch.Tensor]:
    """fmlab's `<ours>.blocks.<i>.<name>.<weight|bias>` -> the reference's `<theirs>.<i>.<name>...`."""
    out = {}
    for key, value in state.items():
        if not key.startswith(ours):
            continue
        index, rest = key.removeprefix(ours).split(".", 1)
        module, param = rest.rsplit(".", 1)
        out[f"{theirs}{index}.{BLOCK_KEYS[module]}.{param}"] = value
    return out


def load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight", "decoder.weight"}
    if set(missing) - tied or unexpected:
        raise KeyError(f"reference model: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return model


def from_fmlab_gpt(gpt: nn.Module) -> RefGPT:
    c = gpt.config
    if c.bias or c.activation != "gelu" or not c.pre_norm or c.dropout or c.mlp_width != 4 * c.n_embd:
        raise ValueError("the reference GPT has no biases, exact GELU, pre-LN, no dropout and a 4x MLP")
    s = gpt.state_dict()
    state = {"wte.weight": s["wte.weight"], "wpe.weight": s["wpe.weight"], "ln_f.weight": s["transformer.ln_f.weight"],
             **map_blocks(s, "transformer.blocks.", "h.")}
    return load(RefGPT(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd), state)


def from_fmlab_bert(bert: nn.Module) -> RefBERT:
    c = bert.config
    if c.pre_norm or c.activation != "gelu" or c.nsp or c.attn_dropout or c.mlp_width != 4 * c.n_embd:
        raise ValueError("the reference BERT is post-LN, exact GELU, MLM only, 4x MLP, no attention dropout")
    s = bert.state_dict()
    state = {"wte.weight": s["wte.weight"], "wpe.weight": s["wpe.weight"], "wtt.weight": s["wtt.weight"],
             **{f"ln_e.{p}": s[f"embed_norm.{p}"] for p in ("weight", "bias")},
             **{f"head_dense.{p}": s[f"mlm_head.dense.{p}"] for p in ("weight", "bias")},
             **{f"head_ln.{p}": s[f"mlm_head.norm.{p}"] for p in ("weight", "bias")},
             "decoder.bias": s["mlm_head.decoder.bias"], **map_blocks(s, "transformer.blocks.", "h.")}
    return load(RefBERT(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.norm_eps, c.dropout), state)


def from_fmlab_mae(task: nn.Module) -> RefMAE:
    """An fmlab MAETask (ViT `model` + `decoder`)."""
    vit, dec, c = task.model, task.decoder, task.model.config
    if not task.norm_pix_loss or c.dropout or c.drop_path or c.activation != "gelu" or c.img_size is None:
        raise ValueError("the reference MAE has normalized-pixel loss, exact GELU, no dropout or drop-path")
    d = task.hparams.decoder
    s = task.state_dict()
    state = {
        "patch_embed.weight": s["model.patch_embed.proj.weight"], "patch_embed.bias": s["model.patch_embed.proj.bias"],
        "cls_token": s["model.cls_token"], "pos_embed": vit.pos_embed, "mask_token": s["decoder.mask_token"],
        "dec_pos_embed": dec.pos_embed,
        **{f"norm.{p}": s[f"model.transformer.ln_f.{p}"] for p in ("weight", "bias")},
        **{f"dec_embed.{p}": s[f"decoder.proj_in.{p}"] for p in ("weight", "bias")},
        **{f"dec_norm.{p}": s[f"decoder.transformer.ln_f.{p}"] for p in ("weight", "bias")},
        **{f"dec_pred.{p}": s[f"decoder.pred.{p}"] for p in ("weight", "bias")},
        **map_blocks(s, "model.transformer.blocks.", "blocks."),
        **map_blocks(s, "decoder.transformer.blocks.", "dec_blocks."),
    }
    size = c.img_size if isinstance(c.img_size, int) else c.img_size[0]
    model = RefMAE(size, c.patch_size, c.in_chans, c.n_layer, c.n_head, c.n_embd, d["n_layer"], d["n_head"],
                   d["n_embd"], task.mask_ratio, c.norm_eps)
    return load(model, state)


# ---- optimizer and schedule ----------------------------------------------------------------------------------------

NO_DECAY = ("wte", "wpe", "wtt", "cls_token", "pos_embed", "mask_token", "dec_pos_embed")


def reference_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                        warmup_steps: int, total_steps: int, min_lr_ratio: float, **_) -> tuple:
    """Fused AdamW with weight decay on the matrices (not embeddings or tables), linear warm-up from 0 over
    `warmup_steps`, then cosine to `min_lr_ratio * lr` at `total_steps`: fmlab's settings, written out."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.split(".")[0] not in NO_DECAY]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n.split(".")[0] not in NO_DECAY)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=tuple(betas), fused=True)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
