"""Extractive-QA featurisation and post-processing with the real all-MiniLM-L6-v2 WordPiece
tokenizer (uncased BERT), checked against transformers' fast tokenizer windows."""


import numpy as np
import pytest
import transformers

from configs import common
from jaxft.data.qa_features import featurize_qa, postprocess_qa, references
from jaxft.data.tokenizer import load_tokenizer

MAX_LEN, STRIDE = 48, 16

# ~96 tokens: with a 7-8 token question a window holds 37-38 context tokens, so it spans 3-4
# windows, and "Margaret Okonkwo-Hale" (8 word pieces) straddles the end of the third one.
LONG = ("The river town grew slowly during the eighteenth century. Farmers brought grain to its "
        "mills, and merchants shipped flour downstream on flat boats every spring. A stone bridge "
        "replaced the old ferry in 1820, and a school opened beside the church a decade later. "
        "Floods damaged the lower streets twice, so the council raised the embankment along the "
        "water. The railway arrived late, in 1871, and the first station master was Margaret "
        "Okonkwo-Hale, who kept the post for forty years.")
CAFE = ("Zoë Brontë-Ñúñez opened «Le Café Étoilé» in Montréal in 1923; it served crème brûlée, "
        "and its sister house stood in Tokyo (東京).")
PROBE = "The probe was built by NASA and launched from Cape Canaveral in 1977."


def _ex(ex_id, question, context, *answers, impossible=False):
  """A SQuAD-format example; answer_start is found in the context so the fixtures stay correct."""
  return {"id": ex_id, "question": question, "context": context, "is_impossible": impossible,
          "answers": {"text": list(answers), "answer_start": [context.index(a) for a in answers]}}


EXAMPLES = [
    _ex("paris", "What is the capital of France?",
        "Paris is the capital and most populous city of France.", "Paris"),
    _ex("station", "Who was the first station master?", LONG, "Margaret Okonkwo-Hale"),
    _ex("railway", "In what year did the railway arrive?", LONG, "1871"),
    _ex("designer", "Who designed the stone bridge?", LONG, impossible=True),
    _ex("cafe", "What was the café called?", CAFE, "Le Café Étoilé"),
    _ex("tokyo", "Where was the sister house?", CAFE, "Tokyo (東京)", "東京"),
    # uncased tokens ("nasa", "cape", "canaveral"): the answer must come back as written
    _ex("agency", "which agency built the probe?", PROBE, "NASA"),
    _ex("launch", "Where was the probe launched from?", PROBE, "Cape Canaveral"),
]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(common.minilm_dir())


@pytest.fixture(scope="module")
def features(tok):
  return featurize_qa(EXAMPLES, tok, MAX_LEN, STRIDE)


def _index(ex_id):
  return next(i for i, e in enumerate(EXAMPLES) if e["id"] == ex_id)


def _rows(features, i):
  return np.flatnonzero(features["example_index"] == i)


def _span_text(features, row, context):
  offsets = features["offsets"][row]
  s, e = features["start_positions"][row], features["end_positions"][row]
  return context[offsets[s, 0]:offsets[e, 1]], int(offsets[s, 0]), int(offsets[e, 1])


def test_labels_map_back_to_the_exact_gold_text(features):
  for i, ex in enumerate(EXAMPLES):
    rows = _rows(features, i)
    labelled = [r for r in rows if features["start_positions"][r] != 0]
    if ex["is_impossible"]:
      assert not labelled
      assert (features["end_positions"][rows] == 0).all()
      continue
    gold, gold_start = ex["answers"]["text"][0], ex["answers"]["answer_start"][0]
    assert labelled, ex["id"]
    for r in labelled:  # every window holding the answer points at it, character-exact
      assert features["context_mask"][r, features["start_positions"][r]]
      assert _span_text(features, r, ex["context"]) == (gold, gold_start, gold_start + len(gold))
    for r in set(rows) - set(labelled):
      assert features["end_positions"][r] == 0


def test_long_context_answers_in_later_windows_and_across_a_boundary(features):
  station, railway = _index("station"), _index("railway")
  for i in (station, railway):
    rows = _rows(features, i)
    assert len(rows) >= 3
    assert features["start_positions"][rows[0]] == 0  # not in the first window
  # "1871" first appears in the third window
  assert [bool(features["start_positions"][r]) for r in _rows(features, railway)][:3] == \
      [False, False, True]
  # the name starts inside one window but ends past it: that window is labelled [CLS], the next
  # one holds the whole span
  ex = EXAMPLES[station]
  start_char = ex["answers"]["answer_start"][0]
  end_char = start_char + len(ex["answers"]["text"][0])
  rows = _rows(features, station)
  ends = [features["offsets"][r][features["context_mask"][r]][-1, 1] for r in rows]
  cut = [k for k, end in enumerate(ends) if start_char < end < end_char]
  assert cut, "fixture no longer puts the answer across a window boundary"
  assert features["start_positions"][rows[cut[0]]] == 0
  assert features["start_positions"][rows[cut[0] + 1]] != 0


def test_windows_cover_the_context_and_overlap_by_doc_stride(tok, features):
  for i, ex in enumerate(EXAMPLES):
    rows = _rows(features, i)
    assert np.all(np.diff(rows) == 1)  # an example's windows are consecutive rows, in order
    whole = tok.backend.encode(ex["context"], add_special_tokens=False)
    windows = [[tuple(o) for o in features["offsets"][r][features["context_mask"][r]]]
               for r in rows]
    assert set().union(*windows) == set(whole.offsets)  # every context token in some window
    assert windows[0][0] == whole.offsets[0] and windows[-1][-1] == whole.offsets[-1]
    for a, b in zip(windows, windows[1:], strict=False):
      assert a[-STRIDE:] == b[:STRIDE]  # exactly doc_stride shared tokens, then new ones
      assert whole.offsets.index(b[STRIDE]) == whole.offsets.index(a[-1]) + 1
    if len(rows) > 1:  # a split context fills its windows up to max_len
      assert (features["segment_ids"][rows[:-1]].sum(1) == MAX_LEN).all()


def test_padding_segment_ids_and_token_types(tok, features):
  n = len(features["example_index"])
  cls, sep, pad = (tok.special_id(r) for r in ("cls_token", "sep_token", "pad_token"))
  for key in ("inputs", "token_types", "segment_ids", "context_mask"):
    assert features[key].shape == (n, MAX_LEN), key
  assert features["offsets"].shape == (n, MAX_LEN, 2)
  for key in ("start_positions", "end_positions", "example_index"):
    assert features[key].shape == (n,)
  for key in ("inputs", "token_types", "segment_ids", "offsets", "start_positions",
              "end_positions", "example_index"):
    assert features[key].dtype == np.int32, key
  assert features["context_mask"].dtype == bool
  assert n > len(EXAMPLES)
  for r in range(n):
    ids, types, seg = features["inputs"][r], features["token_types"][r], features["segment_ids"][r]
    length = int(seg.sum())
    assert (seg[:length] == 1).all() and (seg[length:] == 0).all()
    assert (ids[length:] == pad).all() and (types[length:] == 0).all()
    assert ids[0] == cls and ids[length - 1] == sep
    first_sep = int(np.flatnonzero(ids == sep)[0])
    assert (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:length] == 1).all()
    ctx = features["context_mask"][r]
    assert np.flatnonzero(ctx).tolist() == list(range(first_sep + 1, length - 1))
    assert (features["offsets"][r][~ctx] == -1).all() and (features["offsets"][r][ctx] >= 0).all()


def test_same_windows_and_ids_as_transformers_fast_tokenizer(features):
  hf = transformers.AutoTokenizer.from_pretrained(common.minilm_dir())
  enc = hf([e["question"] for e in EXAMPLES], [e["context"] for e in EXAMPLES],
           truncation="only_second", max_length=MAX_LEN, stride=STRIDE,
           return_overflowing_tokens=True, return_offsets_mapping=True)
  assert list(enc["overflow_to_sample_mapping"]) == features["example_index"].tolist()
  for r, ids in enumerate(enc["input_ids"]):
    length = len(ids)
    assert features["segment_ids"][r].sum() == length
    assert features["inputs"][r, :length].tolist() == ids
    assert features["token_types"][r, :length].tolist() == enc["token_type_ids"][r]
    context = [k for k, s in enumerate(enc.sequence_ids(r)) if s == 1]
    assert np.flatnonzero(features["context_mask"][r]).tolist() == context
    assert [tuple(o) for o in features["offsets"][r, context]] == \
        [tuple(enc["offset_mapping"][r][k]) for k in context]


def _oracle_logits(features, examples, rng):
  """Small noise everywhere, large logits at the gold span of the first window holding it and,
  for an impossible question, at [CLS] in all its windows."""
  shape = features["inputs"].shape
  start, end = rng.normal(0, 0.1, shape), rng.normal(0, 0.1, shape)
  for i, ex in enumerate(examples):
    rows = _rows(features, i)
    if ex["is_impossible"]:
      start[rows, 0] = end[rows, 0] = 10.0
      continue
    r = next(r for r in rows if features["start_positions"][r] != 0)
    start[r, features["start_positions"][r]] = 10.0
    end[r, features["end_positions"][r]] = 10.0
  return start.astype(np.float32), end.astype(np.float32)


@pytest.mark.parametrize("version_2", [False, True])
def test_oracle_logits_give_back_the_gold_answers(features, version_2):
  start, end = _oracle_logits(features, EXAMPLES, np.random.default_rng(0))
  preds = postprocess_qa(EXAMPLES, features, start, end, version_2=version_2)
  assert set(preds) == {e["id"] for e in EXAMPLES}
  for ex in EXAMPLES:
    pred = preds[ex["id"]]
    if ex["is_impossible"]:
      if version_2:
        assert pred == {"text": "", "start": -1, "end": -1, "score": pytest.approx(20.0, abs=1)}
      else:  # SQuAD v1.1 always answers with some span of the context
        assert pred["text"] and ex["context"][pred["start"]:pred["end"]] == pred["text"]
      continue
    gold, gold_start = ex["answers"]["text"][0], ex["answers"]["answer_start"][0]
    assert (pred["text"], pred["start"], pred["end"]) == (gold, gold_start, gold_start + len(gold))
    assert pred["score"] == pytest.approx(20.0, abs=1)
  assert preds["agency"]["text"] == "NASA" and preds["cafe"]["text"] == "Le Café Étoilé"


def test_postprocess_span_rules_and_null_threshold(features):
  i = _index("launch")
  rows = _rows(features, i)
  assert len(rows) == 1
  r, sub = rows[0], [EXAMPLES[i]]
  feats = {k: v[rows] for k, v in features.items()}
  feats["example_index"][:] = 0  # its index in `sub`
  ctx = np.flatnonzero(features["context_mask"][r])
  off = features["offsets"][r]

  def logits(*spans):
    start, end = np.zeros((1, MAX_LEN), np.float32), np.zeros((1, MAX_LEN), np.float32)
    for s, e, value in spans:
      start[0, s], end[0, e] = value, value
    return start, end

  # the best pair lies in the question (50 + 50): never an answer; next, the whole context
  start, end = logits((1, 1, 50.0), (ctx[0], ctx[-1], 30.0), (ctx[2], ctx[2], 5.0))
  whole = postprocess_qa(sub, feats, start, end)["launch"]
  assert whole == {"text": PROBE, "start": 0, "end": len(PROBE), "score": pytest.approx(60.0)}
  # capped at 3 tokens: "The probe was" (30 + 5) beats "was" alone (5 + 5)
  short = postprocess_qa(sub, feats, start, end, max_answer_len=3)["launch"]
  assert short["text"] == PROBE[:off[ctx[2], 1]] == "The probe was"
  # only the top start and end (both in the question): nothing valid is left
  none = postprocess_qa(sub, feats, start, end, n_best=1)["launch"]
  assert none == {"text": "", "start": -1, "end": -1, "score": float("-inf")}
  # version_2: null score 100 vs best 60 -> "" unless the threshold allows the 40-point gap
  start[0, 0] = end[0, 0] = 50.0
  null = postprocess_qa(sub, feats, start, end, version_2=True)["launch"]
  assert null == {"text": "", "start": -1, "end": -1, "score": pytest.approx(100.0)}
  kept = postprocess_qa(sub, feats, start, end, version_2=True, null_threshold=45.0)
  assert kept["launch"]["text"] == PROBE
  # an end before its start (40 + 40) is skipped: "was built" (5 + 40) wins
  start, end = logits((ctx[5], ctx[3], 40.0), (ctx[2], ctx[2], 5.0))
  assert postprocess_qa(sub, feats, start, end)["launch"]["text"] == "was built"
  with pytest.raises(ValueError, match=r"\['station', 'railway'.* have no features"):
    postprocess_qa(EXAMPLES, feats, start, end)
  with pytest.raises(ValueError, match="one row per feature"):
    postprocess_qa(sub, feats, start[:, :10], end)


def test_references():
  refs = references(EXAMPLES)
  assert refs["designer"] == [] and refs["tokyo"] == ["Tokyo (東京)", "東京"]
  assert refs["agency"] == ["NASA"]


def test_eval_features_have_no_labels_and_the_shared_tokenizer_is_untouched(tok, features):
  before = tok.backend.to_str()
  ev = featurize_qa(EXAMPLES, tok, MAX_LEN, STRIDE, train=False)
  assert "start_positions" not in ev and "end_positions" not in ev
  for k, v in ev.items():
    np.testing.assert_array_equal(v, features[k])
  assert tok.backend.to_str() == before and tok.backend.truncation is None
  assert tok.encode(LONG) == tok.backend.encode(LONG, add_special_tokens=False).ids


def test_long_question_is_cut_to_max_question_len(tok):
  question = "Which " + "very " * 40 + "old town had a stone bridge?"
  ex = _ex("long-q", question, LONG, "1820")
  feats = featurize_qa([ex], tok, 64, 8, max_question_len=12)
  first_sep = np.flatnonzero(feats["inputs"][0] == tok.special_id("sep_token"))[0]
  assert first_sep == 1 + 12  # [CLS] + 12 question tokens
  assert feats["inputs"][0, 1:first_sep].tolist() == tok.encode(question)[:12]
  with pytest.raises(ValueError, match="Lower doc_stride"):
    featurize_qa([ex], tok, 64, 16, max_question_len=60)


def test_answer_not_in_context_names_the_example(tok):
  bad = _ex("bad-start", "What is the capital of France?", "Paris is the capital of France.",
            "Paris")
  bad["answers"]["answer_start"] = [3]
  with pytest.raises(ValueError, match=r"QA answer not found in its context.*'bad-start'.*"
                                       r"'Paris'.*answer_start=3.*'is is'.*Fix the answer_start"):
    featurize_qa([EXAMPLES[0], bad], tok, MAX_LEN, STRIDE)
  unanswered = _ex("no-answer", "Why?", "Because.")
  with pytest.raises(ValueError, match="'no-answer' has no answers but is_impossible=False"):
    featurize_qa([unanswered], tok, MAX_LEN, STRIDE, train=False)
  with pytest.raises(ValueError, match="appears more than once"):
    featurize_qa([EXAMPLES[0], EXAMPLES[0]], tok, MAX_LEN, STRIDE)
