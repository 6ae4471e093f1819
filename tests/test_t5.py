"""T5: relative position buckets as T5 defines them, padding and causal masks, KV-cached generation equal to the
uncached reference, beam search beating greedy where it should, span corruption on known sequences, the backbone
contract, and Hugging Face round trips (v1.0 ReLU tied, v1.1 gated-GELU untied) within 1e-4."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fmlab.errors import UserError
from fmlab.interop import hf_t5
from fmlab.models.seq2seq_search import beam_search, greedy_or_sample
from fmlab.models.t5 import T5, T5Config
from fmlab.models.t5_layers import relative_position_bucket
from fmlab.tasks.classification import ClassificationTask
from fmlab.tasks.span_corruption import corrupt_spans, random_spans_noise_mask, span_counts

transformers = pytest.importorskip("transformers")
VOCAB = 50


def tiny(**kw) -> T5:
    """A 2+2-block T5 of width 32, randomised enough that greedy decoding does not repeat one token."""
    cfg = {"vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "dropout": 0.0,
           "attn_dropout": 0.0, "relative_buckets": 8, "relative_max_distance": 16, **kw}
    torch.manual_seed(0)
    model = T5Config(**cfg).build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return ids, mask


# ---- the model ----------------------------------------------------------------------------------------------------


def test_relative_buckets_are_t5s() -> None:
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    distance = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 16)):
            ours = relative_position_bucket(distance, bidirectional, buckets, max_distance)
            assert torch.equal(ours, theirs(distance, bidirectional, buckets, max_distance))
            assert int(ours.max()) == buckets - 1


def test_a_padded_source_position_changes_nothing_a_real_one_does() -> None:
    model = tiny()
    ids, mask = source_batch()
    decoder_inputs = torch.randint(2, VOCAB, (3, 6))
    logits = model(ids, decoder_inputs, mask)
    changed = ids.clone()
    changed[1, 9] = (changed[1, 9] + 1) % VOCAB  # padding of row 1
    assert torch.allclose(model(changed, decoder_inputs, mask), logits, atol=1e-6)
    assert torch.allclose(model.encode(changed, mask)[1, :8], model.encode(ids, mask)[1, :8], atol=1e-6)
    changed[1, 3] = (changed[1, 3] + 1) % VOCAB  # a real token of row 1
    assert not torch.allclose(model(changed, decoder_inputs, mask)[1], logits[1], atol=1e-4)


def test_the_decoder_is_causal() -> None:
    model = tiny()
    ids, mask = source_batch()
    decoder_inputs = torch.randint(2, VOCAB, (3, 6))
    later = decoder_inputs.clone()
    later[:, 4] = (later[:, 4] + 1) % VOCAB
    a, b = model(ids, decoder_inputs, mask), model(ids, later, mask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_kv_cached_generation_equals_the_uncached_reference(strategy: str) -> None:
    model = tiny(tie_embeddings=False, gated_mlp=True, activation="gelu_tanh")
    ids, mask = source_batch()
    kw = {"max_new_tokens": 10, "strategy": strategy, "num_beams": 3, "eos_id": 1}
    cached = model.generate(ids, mask, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(ids, mask, use_cache=False, **kw))
    assert cached.shape == (3, 10) and len(cached.unique()) > 3, "a varied sequence, not one token repeated"


def test_greedy_generation_is_the_argmax_of_teacher_forcing() -> None:
    model = tiny()
    ids, mask = source_batch()
    out = model.generate(ids, mask, max_new_tokens=6)
    logits = model(ids, model.shift_right(out), mask)
    assert torch.equal(logits.argmax(dim=-1), out)


class TableState:
    """A decoder whose next-token logits depend on the previous token only (a fixed table)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, -1]]

    def reorder(self, index: torch.Tensor) -> None:
        pass


def test_beam_search_beats_greedy_where_the_greedy_first_token_leads_nowhere() -> None:
    START, A, B, EOS = 0, 1, 2, 3
    probs = torch.full((4, 4), 1e-6)
    probs[START, A], probs[START, B] = 0.55, 0.45  # greedy takes A ...
    probs[A, A], probs[A, B], probs[A, EOS] = 0.34, 0.33, 0.33  # ... where nothing is likely
    probs[B, EOS] = 0.98  # while B is almost surely followed by the end
    table = probs.log()
    start = torch.tensor([START])

    def logprob(seq: list[int]) -> float:
        prev = [START, *seq[:-1]]
        return sum(float(table.log_softmax(-1)[p, t]) for p, t in zip(prev, seq, strict=True))

    greedy = greedy_or_sample(TableState(table), start, 4, eos_id=EOS)[0].tolist()
    beam, score = beam_search(TableState(table), start, num_beams=2, max_new_tokens=4, eos_id=EOS,
                              length_penalty=0.0)
    assert greedy[0] == A and beam[0].tolist()[:2] == [B, EOS]
    greedy_total = logprob(greedy[: greedy.index(EOS) + 1] if EOS in greedy else greedy)
    assert logprob([B, EOS]) > greedy_total
    assert float(score[0]) == pytest.approx(logprob([B, EOS]), abs=1e-5)


def test_sampling_is_seeded_and_top_k_limits_the_choice() -> None:
    model = tiny()
    ids, mask = source_batch()
    draw = lambda seed, k: model.generate(ids, mask, 8, "sample", temperature=1.5, top_k=k,  # noqa: E731
                                          generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0, None), draw(0, None)) and not torch.equal(draw(0, None), draw(1, None))
    assert torch.equal(draw(3, 1), model.generate(ids, mask, 8, "greedy")), "top-1 sampling is greedy"


def test_contract_layers_decay_and_encoder_only_use() -> None:
    model = tiny(n_decoder_layer=4)
    assert model.num_layers == 2 and model.width == 32 and model.default_pooling == "mean"
    assert model.layer_id("wte.weight") == 0
    assert model.layer_id("encoder.blocks.1.attn.qkv.weight") == 2
    assert [model.layer_id(f"decoder.blocks.{j}.mlp.fc.weight") for j in range(4)] == [1, 1, 2, 2]
    assert model.layer_id("decoder.ln_f.weight") == 3
    assert {"wte.weight", "encoder.relative_bias.table.weight", "decoder.relative_bias.table.weight"} == \
        model.no_weight_decay()
    node = {"_target_": "fmlab.models.t5.T5Config", "vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "n_embd": 32}
    task = ClassificationTask(node, {"_target_": "torch.optim.AdamW", "lr": 1e-3}, {}, num_labels=3)
    assert task.model.decoder is None, "a classifier reads the encoder: the decoder is a pre-training head"
    ids, mask = source_batch()
    assert task({"input_ids": ids, "attention_mask": mask}).shape == (3, 3)


def test_config_errors_name_the_option() -> None:
    with pytest.raises(UserError, match="model.bias"):
        T5Config(bias=True)
    with pytest.raises(UserError, match="model.n_embd=512 is not divisible"):
        T5Config(n_embd=512, n_head=6)
    assert T5Config(n_embd=512, n_head=6, head_size=64).head_dim == 64, "T5's d_kv need not divide the width"
    assert T5Config.from_name("v1_1-small").gated_mlp and T5Config.from_name("small").n_decoder_layer == 6


# ---- span corruption ------------------------------------------------------------------------------------------------


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """Put back into the inputs what the targets say each sentinel hid."""
    hidden, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            hidden[current] = []
        else:
            hidden[current].append(t)
    out = []
    for t in inputs[:-1]:
        out += hidden[t] if t in sentinels else [t]
    assert inputs[-1] == targets[-1] == eos
    return out


def test_span_corruption_on_a_known_sequence() -> None:
    L, sentinels, eos = 200, list(range(1000, 1100)), 7
    ids = torch.arange(10, 10 + L).repeat(64, 1)
    g = torch.Generator().manual_seed(0)
    inputs, targets = corrupt_spans(ids, torch.tensor(sentinels), eos, 0.15, 3.0, g)
    noise, spans = span_counts(L, 0.15, 3.0)
    assert (noise, spans) == (30, 10)
    assert inputs.shape == (64, L - noise + spans + 1) and targets.shape == (64, noise + spans + 1)
    for row_in, row_tgt in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert reconstruct(row_in, row_tgt, sentinels, eos) == ids[0].tolist()
        assert row_tgt[0] == sentinels[0] and [t for t in row_tgt if t in sentinels] == sentinels[:spans]
        assert row_in[-2] == sentinels[spans - 1], "as T5: the window ends with a dropped span"
        assert row_in[0] == ids[0, 0], "... and starts with kept tokens"
    mask = random_spans_noise_mask(2000, L, 0.15, 3.0, torch.Generator().manual_seed(1))
    runs = mask & ~F.pad(mask[:, :-1], (1, 0))
    assert (mask.sum(1) == noise).all() and (runs.sum(1) == spans).all()
    lengths = torch.cat([torch.diff(torch.nonzero(torch.diff(F.pad(r.int(), (1, 1)))).flatten())[::2] for r in mask])
    assert lengths.float().mean().item() == pytest.approx(3.0, abs=1e-6) and lengths.min() >= 1
    assert lengths.max() > 6, "span lengths vary, as T5's random segmentation gives"
    again = corrupt_spans(ids, torch.tensor(sentinels), eos, 0.15, 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs), "a seed repeats the corruption (validation uses one per batch)"
    with pytest.raises(UserError, match="data.num_sentinels"):
        corrupt_spans(ids, torch.tensor(sentinels[:5]), eos)


# ---- Hugging Face ------------------------------------------------------------------------------------------------


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def hf_t5_config(feed_forward_proj: str, tied: bool) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied, decoder_start_token_id=0,
    )


def ours_from(folder: Path) -> T5:
    node, state = hf_t5.from_hf(json.loads((folder / "config.json").read_text()),
                                load_file(str(folder / "model.safetensors")))
    model = hydra.utils.instantiate(node).build().eval()
    model.load_state_dict(state, strict=True)
    return model


def assert_same(ours: T5, hf, beams: bool = True) -> None:
    ids, mask = source_batch()
    decoder_inputs = torch.randint(2, VOCAB, (3, 7))
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs)
        assert (ours.encode(ids, mask) - out.encoder_last_hidden_state).abs().max() < 1e-4
        assert (ours(ids, decoder_inputs, mask) - out.logits).abs().max() < 1e-4
    if beams:  # the same beam search: transformers' hypotheses, scores and early stop
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
                             eos_token_id=1, pad_token_id=0, early_stopping=False)[:, 1:]
        mine = ours.generate(ids, mask, 8, "beam", num_beams=3, eos_id=1)[:, : theirs.size(1)]
        assert torch.equal(mine.masked_fill(theirs == 0, 0), theirs)


@pytest.mark.parametrize(("proj", "tied"), [("relu", True), ("gated-gelu", False)], ids=["v1.0", "v1.1"])
def test_a_transformers_t5_folder_loads_and_computes_the_same(tmp_path: Path, proj: str, tied: bool) -> None:
    hf = randomize(transformers.T5ForConditionalGeneration(hf_t5_config(proj, tied)))
    hf.save_pretrained(tmp_path)
    ours = ours_from(tmp_path)
    assert ours.config.gated_mlp == (proj != "relu") and ours.config.tie_embeddings == tied
    assert_same(ours, hf)


def test_an_untied_v1_1_folder_keeps_its_own_output_layer(tmp_path: Path) -> None:
    """Written as transformers 4 writes google/t5-v1_1-*: tie_word_embeddings false, lm_head its own tensor."""
    randomize(transformers.T5ForConditionalGeneration(hf_t5_config("gated-gelu", False))).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = torch.randn(VOCAB, 32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(hf.lm_head.weight, state["lm_head.weight"])
    ours = ours_from(tmp_path)
    assert torch.equal(ours.lm_head.weight, state["lm_head.weight"])
    assert_same(ours, hf, beams=False)


@pytest.mark.parametrize("v1_1", [False, True], ids=["v1.0", "v1.1"])
def test_ours_exports_to_a_folder_transformers_loads(tmp_path: Path, v1_1: bool) -> None:
    kw = {"tie_embeddings": False, "gated_mlp": True, "activation": "gelu_tanh"} if v1_1 else {}
    ours = tiny(n_head=4, **kw)
    config, state = hf_t5.to_hf(ours, None)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same(ours, hf)
    assert torch.equal(ours_from(tmp_path).state_dict()["wte.weight"], ours.wte.weight), "and back"


def test_unsupported_hf_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="feed_forward_proj"):
        hf_t5.from_hf({"feed_forward_proj": "gated-silu", "num_layers": 1, "num_heads": 1, "d_model": 8, "d_kv": 8,
                       "d_ff": 8, "vocab_size": 10}, {})
    with pytest.raises(UserError, match="model.activation=gelu_tanh"):
        hf_t5.to_hf(tiny(gated_mlp=True, activation="gelu"), None)
    assert math.isclose(T5Config().norm_eps, 1e-6)
