"""Import from Hugging Face: tiny random GPT-2, ViT and BERT folders load through `pretrained=` and compute what
transformers computes; fine-tuning starts from them; a Hub name offline is a clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from safetensors.torch import load_file

from fmlab.data.tokenizer import train_bpe
from fmlab.interop import hf_vit
from fmlab.resolve import PretrainedError, load_pretrained
from fmlab.tasks.pretrained import load_backbone
from fmlab.training import build_datamodule, build_task, run_pretrained, train
from tests.conftest import TINY_GPT, WORDS, compose_config
from tests.image_data import TINY_VIT, write_image_folder
from tests.labeled_data import labeled_rows, write_labeled_csv

transformers = pytest.importorskip("transformers")
PER_CLASS = 20  # labeled rows per topic in the GPT-2 fine-tuning test: 4 per topic in its test split


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random norms and biases too, so a tensor mapped to the wrong place shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def ours(folder: Path) -> torch.nn.Module:
    """Our model built from `pretrained=<folder>`, its weights loaded with the strict key check."""
    pretrained = load_pretrained(str(folder))
    model = hydra.utils.instantiate(pretrained.model).build().eval()
    load_backbone(model, pretrained)
    return model


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def save_gpt2(folder: Path, vocab_size: int = 300, tokenizer=None, **kw) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, **kw)
    hf = randomize(transformers.GPT2LMHeadModel(cfg))
    hf.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return hf


def save_vit(folder: Path, cls=None, **kw) -> torch.nn.Module:
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    hf = randomize((cls or transformers.ViTModel)(cfg))
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_folder_loads_with_conv1d_weights_transposed(tmp_path: Path, activation: str) -> None:
    hf = save_gpt2(tmp_path, activation_function=activation, n_inner=40)
    model = ours(tmp_path)
    assert model.config.intermediate_size == 40 and model.lm_head.weight is model.wte.weight
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_folder_loads_in_both_key_layouts(tmp_path: Path, qkv_bias: bool) -> None:
    hf = save_vit(tmp_path, cls=transformers.ViTForImageClassification, image_size=[16, 8], patch_size=4,
                  num_channels=3, num_labels=4, qkv_bias=qkv_bias, layer_norm_eps=1e-6)
    model = ours(tmp_path)  # the classifier is dropped: a fine-tune starts its own head
    images = torch.randn(2, 3, 16, 8)
    with torch.no_grad():
        hidden = hf(images, output_hidden_states=True).hidden_states[-1]
        expected = hf.vit.layernorm(hidden)
        assert (model.encode(images) - expected).abs().max() < 1e-4
    # transformers 5 module names (a live model's state dict) map to the same tensors as the saved layout
    config = json.loads((tmp_path / "config.json").read_text())
    _, live = hf_vit.from_hf(config, hf.state_dict())
    _, saved = hf_vit.from_hf(config, saved_state(tmp_path))
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in live)


def test_bert_sequence_classifier_folder_loads_without_its_head(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    hf = randomize(transformers.BertForSequenceClassification(cfg))
    hf.save_pretrained(tmp_path)
    model = ours(tmp_path)
    ids = torch.randint(0, 80, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        expected = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.encode(ids, mask)
    assert (expected - got)[mask.bool()].abs().max() < 1e-4


def test_gpt2_folder_fine_tunes(tmp_path: Path, one_thread) -> None:
    write_labeled_csv(tmp_path / "labeled.csv", per_class=PER_CLASS)
    tok = train_bpe([r["text"] for r in labeled_rows(PER_CLASS)] + [" ".join(WORDS)], vocab_size=300)
    torch.manual_seed(0)  # the random GPT-2's init, whatever ran before
    hf = save_gpt2(tmp_path / "gpt2", vocab_size=tok.get_vocab_size(), tokenizer=tok)
    cfg = compose_config([
        *TINY_GPT, "model=gpt", "stage=finetune", f"data.source={tmp_path / 'labeled.csv'}",
        f"paths.cache_dir={tmp_path / 'cache'}", f"pretrained={tmp_path / 'gpt2'}", "data.max_length=32",
        "trainer.max_steps=30", "trainer.val_check_interval=30", "task.optimizer.lr=3e-3", "validate_before_fit=false",
    ], tmp_path / "run")
    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule, pretrained)
    assert task.model.config.n_layer == 2 and task.model.config.block_size == 64  # the source's architecture
    expected = hf.transformer.h[1].attn.c_attn.weight.t()
    assert torch.equal(task.model.transformer.blocks[1].attn.qkv.weight, expected)
    train(cfg)
    report = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    # Five balanced topics, each written with its own six words: chance is 0.2 (loss log 5), and a random GPT-2
    # fine-tuned for 30 steps reads the words (0.95-1.0 over four inits).
    assert [sum(row) for row in report["confusion_matrix"]] == [PER_CLASS // 5] * 5, "the whole test split scored"
    assert report["metrics"]["test/acc"] >= 0.6 and report["metrics"]["test/loss"] < math.log(5), report["metrics"]


def test_vit_folder_fine_tunes_on_images(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", n_per_class=12)
    save_vit(tmp_path / "vit", image_size=28, patch_size=4, num_channels=1)
    cfg = compose_config([
        f"paths.cache_dir={tmp_path / 'cache'}", "model=vit", "stage=finetune", "data=image_folder",
        f"data.source={images}", f"pretrained={tmp_path / 'vit'}", *TINY_VIT, "trainer.max_steps=3",
        "trainer.val_check_interval=3", "validate_before_fit=false",
    ], tmp_path / "run")
    train(cfg)
    assert (tmp_path / "run" / "test_metrics.json").is_file()


def test_hub_name_offline_asks_for_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedError, match=r"pretrained=google/vit-base-patch16-224: .*local folder is needed"):
        load_pretrained("google/vit-base-patch16-224")


def test_unsupported_gpt2_option_names_the_field(tmp_path: Path) -> None:
    save_gpt2(tmp_path, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(PretrainedError, match="scale_attn_by_inverse_layer_idx"):
        load_pretrained(str(tmp_path))


def test_gpt2_folder_continues_pretraining(tmp_path: Path, corpus_dir: Path) -> None:
    tok = train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.txt"))], vocab_size=300)
    hf = save_gpt2(tmp_path / "gpt2", vocab_size=tok.get_vocab_size(), tokenizer=tok)
    cfg = compose_config([
        *TINY_GPT, f"data.source={corpus_dir}", f"data.tokenizer={tmp_path / 'gpt2'}",
        f"pretrained={tmp_path / 'gpt2'}", f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    ], tmp_path / "run")
    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule, pretrained)
    assert torch.equal(task.model.wte.weight, hf.transformer.wte.weight)
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_hub_name_tokenizer_offline_asks_for_a_local_folder(monkeypatch) -> None:
    from fmlab.data.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedError, match="a local folder is needed"):
        load_tokenizer("some-org/some-model-that-is-not-here")
