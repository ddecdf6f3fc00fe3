"""The synthetic in-context-learning task: deterministic files whose labels follow the rules."""

import json
import pathlib

import numpy as np

from jaxft.data import synthetic_icl as icl
from jaxft.data.prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, Template
from jaxft.data.tokenizer import load_tokenizer


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _parse_document(text):
  """The (words, label) pairs of a document written in prompt_eval's default layout."""
  pairs = []
  for block in text.split(DEFAULT_SEPARATOR):
    words, label_line = block.split("\n")
    assert label_line.startswith("Label: ")
    pairs.append((words.split(" "), label_line[len("Label: "):]))
  return pairs


def test_generator_is_deterministic(tmp_path):
  a = icl.write_task(str(tmp_path / "a"), seed=5, n_docs=60)
  b = icl.write_task(str(tmp_path / "b"), seed=5, n_docs=60)
  c = icl.write_task(str(tmp_path / "c"), seed=6, n_docs=60)
  for name in ("pretrain_train", "pretrain_validation", "train", "validation", "test"):
    with open(a[name], "rb") as fa, open(b[name], "rb") as fb, open(c[name], "rb") as fc:
      data = fa.read()
      assert data == fb.read(), name
      assert data != fc.read(), name
  tokenizers = [pathlib.Path(p["tokenizer"], "tokenizer.json").read_text() for p in (a, b)]
  assert tokenizers[0] == tokenizers[1]


def test_labels_follow_the_rules_and_the_tokenizer_covers_the_corpus(tmp_path):
  paths = icl.write_task(str(tmp_path), seed=0, n_docs=200, agree=1 / 3,
                         sizes={"train": 100, "validation": 20, "test": 300})
  docs = _read(paths["pretrain_train"]) + _read(paths["pretrain_validation"])
  assert len(docs) == 200 and {d["rule"] for d in docs} == {"first", "last"}
  assert sum(d["rule"] == "first" for d in docs) == 100  # half and half
  agree = []
  template = Template.parse(DEFAULT_TEMPLATE)
  for d in docs:
    for words, label in _parse_document(d["text"]):
      assert 3 <= len(words) <= 5
      assert label == icl.CATEGORY_OF[words[0] if d["rule"] == "first" else words[-1]]
      assert template.example(" ".join(words), label) in d["text"]
      agree.append(icl.CATEGORY_OF[words[0]] == icl.CATEGORY_OF[words[-1]])
  assert abs(np.mean(agree) - 1 / 3) < 0.05  # ~1,800 examples
  test = _read(paths["test"])
  assert len(test) == 300
  assert all(e["label"] == icl.CATEGORY_OF[e["text"].split(" ")[0]] for e in test)  # "first"
  assert sorted({e["label"] for e in test}) == sorted(icl.LABELS)

  tok = load_tokenizer(paths["tokenizer"])
  assert tok.vocab_size <= icl.VOCAB_SIZE and tok.eos_id is not None
  unk = tok.backend.token_to_id(icl.UNK)
  for d in docs[:20]:
    ids = tok.encode(d["text"])
    assert unk not in ids and tok.decode(ids) == d["text"]
  # A label after "Label:" is one token, the same in a document and as a prompt_eval candidate.
  for label in icl.LABELS:
    (candidate,) = tok.encode(" " + label)
    assert tok.encode(f"cat\nLabel: {label}")[-1] == candidate
