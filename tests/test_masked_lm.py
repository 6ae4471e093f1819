"""BERT masking: 15 % of the maskable tokens, 80/10/10, special tokens untouched, whole words together."""

from __future__ import annotations

import torch

from fmlab.data.tokenizer import train_bpe
from fmlab.tasks.masked_lm import mask_tokens, word_continuation_table
from tests.conftest import WORDS


def test_masking_statistics() -> None:
    V, mask_id = 1000, 4
    special = torch.zeros(V, dtype=torch.bool)
    special[:5] = True
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (256, 128), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # <cls> ... <sep>
    inputs, targets = mask_tokens(ids, mask_id, special, V, 0.15, generator=g)
    chosen = targets != -100
    assert abs(chosen[:, 1:-1].float().mean().item() - 0.15) < 0.005
    assert not chosen[:, [0, -1]].any() and torch.equal(inputs[:, [0, -1]], ids[:, [0, -1]])
    assert torch.equal(targets[chosen], ids[chosen]), "targets are the original tokens"
    assert torch.equal(inputs[~chosen], ids[~chosen]), "unchosen positions are untouched"
    n = chosen.sum().item()
    as_mask = (inputs[chosen] == mask_id).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01  # (plus the rare random draw of the same token)
    assert abs(1 - as_mask - kept - 0.1) < 0.01


def test_whole_word_masking_masks_all_pieces_of_a_word() -> None:
    tok = train_bpe([" ".join(WORDS) * 3, "unbelievable misunderstanding " * 5], vocab_size=300)
    table = word_continuation_table(tok)
    special = torch.zeros(tok.get_vocab_size(), dtype=torch.bool)
    special[[tok.token_to_id(t) for t in ("<|endoftext|>", "<pad>", "<cls>", "<sep>", "<mask>")]] = True
    text = " ".join(["unbelievable misunderstanding market"] * 40)
    ids = torch.tensor([tok.encode(text).ids] * 64)
    assert table[ids].any(), "some words are split into pieces"
    _, targets = mask_tokens(ids, tok.token_to_id("<mask>"), special, tok.get_vocab_size(), 0.3, table,
                             torch.Generator().manual_seed(0))
    chosen = targets != -100
    starts = ~table[ids]
    word = starts.long().cumsum(1)
    for row in range(8):
        for w in word[row].unique():
            in_word = chosen[row][word[row] == w]
            assert in_word.all() or not in_word.any()
    assert 0.2 < chosen.float().mean() < 0.4


def test_mlm_task_with_next_sentence_prediction() -> None:
    from fmlab.tasks.masked_lm import MaskedLMTask

    tok = train_bpe([" ".join(WORDS) * 3], vocab_size=300)
    model = {"_target_": "fmlab.models.bert.BertConfig", "vocab_size": tok.get_vocab_size(), "block_size": 32,
             "n_layer": 1, "n_head": 2, "n_embd": 16, "nsp": True}
    task = MaskedLMTask(model, {}, {})
    task.extra_state["tokenizer"] = tok.to_str()
    batch = torch.randint(5, tok.get_vocab_size(), (8, 33))
    out = task.step(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["loss"] > out["mlm_loss"], "MLM + NSP"
    seq, types, labels = task.sentence_pairs(batch[:, :32], torch.Generator().manual_seed(0))
    assert (seq[:, 0] == tok.token_to_id("<cls>")).all() and types[:, -1].eq(1).all()
    assert set(labels.tolist()) <= {0, 1}
