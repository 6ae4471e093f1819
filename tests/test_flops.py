"""FLOP counts against torch's own count of a real training step (`FlopCounterMode`) on tiny models.

The counter records every matmul, convolution and attention product that a forward + backward runs, at the shapes
they ran with, independently of our formula. It has no formula for the CPU's fused attention kernel, so the steps
run SDPA's math backend, whose products it does see. Our count (6 per weight per token plus 12 L C T per token,
less what is not computed) also charges biases and norm weights as if they were multiplied: that is ~1/C of the
weights, under TOL at width 64, and the count is never below the counter's. A counting mistake is far larger:
the vocabulary projection at every MLM position is +18 %, frozen weights' gradients +50 % (LoRA) to 3x (linear
probe), `block_size` for a short padded batch 5x.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fmlab.data.tokenizer import train_bpe
from fmlab.models.gpt import GPTConfig
from fmlab.tasks.classification import ClassificationTask
from fmlab.tasks.mae import MAETask
from fmlab.tasks.masked_lm import MaskedLMTask
from tests.conftest import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on shared cores
TOL = 0.03  # biases and norms: 1.5-2.4 % of the count at width 64 (see the module docstring)
C, B = 64, 4
VIT = {"_target_": "fmlab.models.vit.ViTConfig", "img_size": 28, "patch_size": 4, "in_chans": 1, "n_layer": 2,
       "n_head": 2, "n_embd": C, "pos_embed": "learned"}


def counted(loss: Callable[[], torch.Tensor]) -> int:
    """FLOPs torch counts for one forward + backward."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss().backward()
    return counter.get_total_flops()


def assert_close(ours: float, torch_count: int) -> None:
    assert torch_count <= ours <= torch_count * (1 + TOL), f"ours {ours:.4g} vs torch {torch_count:.4g}"


@pytest.fixture(scope="module")
def bert() -> dict:
    tok = train_bpe([" ".join(WORDS) * 3], vocab_size=300)
    return {"_target_": "fmlab.models.bert.BertConfig", "vocab_size": tok.get_vocab_size(), "block_size": 64,
            "n_layer": 2, "n_head": 2, "n_embd": C, "tokenizer": tok.to_str()}


def bert_node(bert: dict) -> dict:
    return {k: v for k, v in bert.items() if k != "tokenizer"}


def padded_batch() -> dict[str, torch.Tensor]:
    """12 positions (block_size is 64), two of the four texts shorter and right-padded."""
    mask = torch.ones(B, 12, dtype=torch.long)
    mask[1, 7:], mask[3, 4:] = 0, 0
    ids = torch.randint(5, 300, (B, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0])}


def test_gpt_causal_lm_counts_every_position_and_the_tied_head() -> None:
    gpt = GPTConfig(n_layer=2, n_head=2, n_embd=C, block_size=32, vocab_size=256).build()
    windows = torch.randint(256, (B, 33), generator=torch.Generator().manual_seed(0))
    assert_close(B * gpt.flops_per_sample(), counted(lambda: gpt(windows[:, :-1], windows[:, 1:])[1]))


@pytest.mark.parametrize("nsp", [False, True])
def test_bert_mlm_projects_only_the_masked_positions(bert: dict, nsp: bool) -> None:
    task = MaskedLMTask({**bert_node(bert), "nsp": nsp}, {}, {})
    task.extra_state["tokenizer"] = bert["tokenizer"]
    windows = torch.randint(5, bert["vocab_size"], (B, 65), generator=torch.Generator().manual_seed(0))
    out: dict = {}

    def loss() -> torch.Tensor:
        out.update(task.step(windows, torch.Generator().manual_seed(0)))
        return out["loss"]

    torch_count = counted(loss)
    assert 0 < out["n_masked"] < B * 64 / 2
    assert_close(B * task.flops_per_sample(masked=out["n_masked"] / B), torch_count)
    positions = 63 if nsp else 64  # NSP's [CLS] A [SEP] B [SEP] from two 30-token halves
    assert task.flops_per_sample() == task.flops_per_sample(masked=0.15 * positions)  # the expectation
    assert B * task.model.flops_per_sample() > torch_count * (1 + 4 * TOL), "the head at every position"


@pytest.mark.parametrize("mode", ["full", "linear_probe", "lora"])
def test_text_classification_counts_the_padded_batch_and_the_mode(bert: dict, mode: str) -> None:
    task = ClassificationTask(bert_node(bert), {}, {}, num_labels=3, finetune_mode=mode, lora={"r": 4})
    task.train()
    batch = padded_batch()
    torch_count = counted(lambda: task.head.loss(task(batch), batch))
    ours = task.flops_per_batch(batch)
    if mode == "lora":
        # Frozen embeddings: no gradient reaches the first block's input, so its qkv projection (and adapter A)
        # skips the input gradient our count keeps (2 per weight per token; ~2 % of a 6-layer model).
        qkv = task.model.transformer.blocks[0].attn.qkv
        ours -= 2 * batch["input_ids"].numel() * (qkv.weight.numel() + qkv.lora_A.numel())
    assert_close(ours, torch_count)
    assert task.tokens_per_batch(batch) == B * 12
    assert ours < task.flops_per_sample() * B / 4, "block_size (64) would count 5x the positions"


def test_lora_counts_adapters_fully_and_frozen_weights_without_weight_gradients(bert: dict) -> None:
    full = ClassificationTask(bert_node(bert), {}, {}, num_labels=3)
    lora = ClassificationTask(bert_node(bert), {}, {}, num_labels=3, finetune_mode="lora", lora={"r": 4})
    probe = ClassificationTask(bert_node(bert), {}, {}, num_labels=3, finetune_mode="linear_probe")
    T = 12
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    weights = full.model.encode_weights()
    attention = 4 * 2 * C * T * T
    head = 6 * sum(p.numel() for p in full.head.parameters())
    assert full.flops_per_sample(T) == 6 * weights * T + 3 * attention + head
    assert lora.flops_per_sample(T) == 4 * weights * T + 6 * adapters * T + 3 * attention + head
    assert probe.flops_per_sample(T) == 2 * weights * T + attention + head


@pytest.mark.parametrize("mode", ["full", "linear_probe"])
def test_image_classification_counts_the_mode(mode: str) -> None:
    task = ClassificationTask(VIT, {}, {}, num_labels=3, finetune_mode=mode)
    task.train()
    batch = {"pixel_values": torch.randn(B, 1, 28, 28), "labels": torch.tensor([0, 1, 2, 0])}
    assert_close(task.flops_per_batch(batch), counted(lambda: task.head.loss(task(batch), batch)))
    assert task.tokens_per_batch(batch) is None


def test_mae_counts_each_part_where_it_runs() -> None:
    # 49 patches at mask_ratio 0.75 keep int(12.25) = 12 visible: the count must match what random_masking keeps.
    task = MAETask(VIT, {}, {}, mask_ratio=0.75, decoder={"n_embd": 32, "n_layer": 1, "n_head": 1})
    images = torch.randn(B, 1, 28, 28)
    assert_close(B * task.flops_per_sample(), counted(lambda: task(images)[0]))
