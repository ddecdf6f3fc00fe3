"""Metrics against hand-worked cases, scikit-learn, and conlleval / official SQuAD semantics."""

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from jaxft.tasks import metrics

# --- Classification -------------------------------------------------------------------------

NAMES = ["cat", "dog", "bird", "fish"]
# Confusion (rows truth, cols prediction) over cat/dog/bird; "bird" is never predicted and "fish"
# appears nowhere:          cat dog bird
#                    cat  [  2   1   0 ]   support 3
#                    dog  [  1   1   0 ]   support 2
#                    bird [  1   0   0 ]   support 1
#                 predicted  4   2   0
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 0, 0]


def test_classification_report_by_hand():
  report = metrics.classification_report(Y_TRUE, Y_PRED, NAMES)
  per = report["per_class"]
  # cat: P = 2/4, R = 2/3, F1 = 2·(1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7.
  assert per["cat"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
  # dog: P = R = F1 = 1/2.
  assert per["dog"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
  # bird: never predicted, so precision 0 (not NaN) and nothing recalled.
  assert per["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
  assert per["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
  assert report["accuracy"] == 0.5 and report["support"] == 6  # 3 of 6 on the diagonal
  # Macro over all four names, fish included: P = (1/2 + 1/2)/4, R = (2/3 + 1/2)/4 = 7/24,
  # F1 = (4/7 + 1/2)/4 = (15/14)/4 = 15/56.
  assert report["macro"] == pytest.approx({"precision": 0.25, "recall": 7 / 24, "f1": 15 / 56})
  # Weighted by support 3/2/1/0: P = (3·1/2 + 2·1/2)/6 = 5/12, R = (3·2/3 + 2·1/2)/6 = 1/2 (always
  # the accuracy), F1 = (3·4/7 + 2·1/2)/6 = (19/7)/6 = 19/42.
  assert report["weighted"] == pytest.approx({"precision": 5 / 12, "recall": 0.5, "f1": 19 / 42})
  # Single-label micro averaging counts every sample once on each side: P = R = F1 = accuracy.
  assert report["micro"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
  assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("seed", range(8))
def test_classification_report_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  k, n = int(rng.integers(2, 7)), int(rng.integers(1, 60))
  # Labels drawn from a subset of the classes, so some are missing from truth and/or predictions.
  y_true = rng.integers(0, k, n) if seed % 2 else rng.integers(0, max(1, k - 2), n)
  y_pred = rng.integers(0, k, n) if seed % 3 else rng.integers(1, k, n)
  report = metrics.classification_report(y_true.tolist(), y_pred.tolist(),
                                         [f"c{i}" for i in range(k)])
  labels = list(range(k))
  p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
  for i, m in enumerate(report["per_class"].values()):
    assert [m["precision"], m["recall"], m["f1"]] == pytest.approx([p[i], r[i], f[i]])
    assert m["support"] == s[i]
  for avg in ("macro", "micro", "weighted"):
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                 zero_division=0)
    assert [report[avg][key] for key in ("precision", "recall", "f1")] == pytest.approx([p, r, f])
  assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
  assert metrics.accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))


def test_classification_rejects_bad_input():
  with pytest.raises(ValueError, match="outside"):
    metrics.classification_report([0, 3], [0, 1], ["a", "b"])
  with pytest.raises(ValueError, match="shape"):
    metrics.classification_report([0, 1], [0], ["a", "b"])
  with pytest.raises(ValueError, match="unique"):
    metrics.classification_report([0], [0], ["a", "a"])
  with pytest.raises(ValueError, match="shape"):
    metrics.accuracy([1, 2], [1])


def test_format_classification_report():
  text = metrics.format_classification_report(metrics.classification_report(Y_TRUE, Y_PRED, NAMES))
  lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
  assert lines["cat"] == ["cat", "0.5000", "0.6667", "0.5714", "3"]
  assert lines["fish"] == ["fish", "0.0000", "0.0000", "0.0000", "0"]
  assert lines["accuracy"] == ["accuracy", "0.5000", "6"]
  assert lines["weighted"] == ["weighted", "avg", "0.4167", "0.5000", "0.4524", "6"]
  assert lines["macro"][-2:] == ["0.2679", "6"] and lines["micro"][-2:] == ["0.5000", "6"]
  assert "precision" in text and "f1-score" in text


# --- Entity-level NER -----------------------------------------------------------------------


@pytest.mark.parametrize("tags, entities", [
    # IOB2.
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    # A chunk running to the end of the sentence is closed there.
    (["O", "B-MISC", "I-MISC"], [("MISC", 1, 3)]),
    # IOB1: "I-" after "O" or after another type starts a chunk; "B-" starts one after "I-".
    (["I-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"],
     [("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6)]),
    (["I-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),
    # A type change splits the chunk even without a "B-".
    (["B-PER", "I-ORG", "I-ORG"], [("PER", 0, 1), ("ORG", 1, 3)]),
    # IOBES; plain conlleval.pl would merge the two S-LOC and the PER run into single chunks.
    (["B-PER", "I-PER", "E-PER", "S-LOC", "S-LOC", "B-ORG", "E-ORG", "O"],
     [("PER", 0, 3), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7)]),
    (["S-PER", "B-PER", "E-PER", "B-PER", "E-PER"], [("PER", 0, 1), ("PER", 1, 3), ("PER", 3, 5)]),
    # IOE1: "E-" closes a chunk that another of the same type follows.
    (["I-NP", "E-NP", "I-NP", "O"], [("NP", 0, 2), ("NP", 2, 3)]),
    # conlleval splits at the first hyphen only.
    (["B-PER-NAME", "I-PER-NAME"], [("PER-NAME", 0, 2)]),
    # Type-less tags (no hyphen) start nothing after "O", but after a typed chunk they start an
    # empty-type chunk that "O" does not end (no type change), conlleval's rule.
    (["O", "PER", "PER", "O"], []),
    (["B-LOC", "PER", "O"], [("LOC", 0, 1), ("", 1, 3)]),
    ([], []),
])
def test_extract_entities_follows_conlleval(tags, entities):
  assert metrics.extract_entities(tags) == entities


def test_entity_scores_by_hand():
  true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
  scores = metrics.entity_scores(true, pred)
  # Gold: PER(0,2) LOC(3,4) | ORG(0,1) PER(2,3) -> 4.  Predicted: PER(0,2) ORG(3,4) | ORG(0,1) -> 3.
  # Correct: PER(0,2), ORG(0,1) -> 2.  P = 2/3, R = 2/4, F1 = (2/3) / (7/6) = 4/7.
  assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == 0.5
  assert scores["f1"] == pytest.approx(4 / 7)
  assert (scores["true_entities"], scores["predicted_entities"], scores["correct"]) == (4, 3, 2)
  assert scores["accuracy"] == pytest.approx(5 / 7) and scores["tokens"] == 7  # tags 3/4 + 2/3
  per = scores["per_type"]
  assert list(per) == ["LOC", "ORG", "PER"]
  # PER: 2 gold, 1 predicted, 1 right -> P 1, R 1/2, F1 2/3.  ORG: 1 gold, 2 predicted, 1 right ->
  # P 1/2, R 1, F1 2/3.  LOC: never predicted -> all 0.
  assert per["PER"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2,
                                      "predicted": 1})
  assert per["ORG"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1,
                                      "predicted": 2})
  assert per["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
  assert json.loads(json.dumps(scores)) == scores


def test_entity_scores_exact_match_and_errors():
  sent = ["B-PER", "I-PER", "O", "B-LOC"]
  perfect = metrics.entity_scores([sent], [sent])
  assert [perfect[key] for key in ("precision", "recall", "f1", "accuracy")] == [1, 1, 1, 1]
  # Boundary error: PER(0,1) instead of PER(0,2) is a false positive and a false negative at once.
  # LOC is right: P = R = F1 = 1/2.
  boundary = metrics.entity_scores([sent], [["B-PER", "O", "O", "B-LOC"]])
  assert (boundary["precision"], boundary["recall"], boundary["f1"]) == (0.5, 0.5, 0.5)
  assert boundary["per_type"]["PER"]["predicted"] == 1 and boundary["per_type"]["PER"]["f1"] == 0
  # Type error: right span, wrong type, nothing correct; ORG has no gold support.
  wrong_type = metrics.entity_scores([["B-PER", "I-PER"]], [["B-ORG", "I-ORG"]])
  assert (wrong_type["precision"], wrong_type["recall"], wrong_type["f1"]) == (0, 0, 0)
  assert wrong_type["per_type"]["ORG"]["support"] == 0
  assert wrong_type["per_type"]["PER"]["predicted"] == 0


def test_entity_scores_keep_sentences_apart():
  # The same span in a different sentence is not a match.
  moved = metrics.entity_scores([["B-PER", "I-PER"], ["O", "O"]], [["O", "O"], ["B-PER", "I-PER"]])
  assert moved["correct"] == 0
  # A sentence boundary ends a chunk, so "I-PER" opening the next sentence is a new one.
  split = metrics.entity_scores([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]])
  assert split["true_entities"] == split["correct"] == 2


def test_entity_scores_reject_mismatched_lengths():
  with pytest.raises(ValueError, match="sentence 1"):
    metrics.entity_scores([["O", "O"], ["O"]], [["O", "O"], ["O", "O"]])
  with pytest.raises(ValueError, match="2 gold sentences but 1"):
    metrics.entity_scores([["O"], ["O"]], [["O"]])


def test_format_entity_report():
  scores = metrics.entity_scores([["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]],
                                 [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]])
  text = metrics.format_entity_report(scores)
  lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
  assert lines["PER"] == ["PER", "1.0000", "0.5000", "0.6667", "2", "1"]
  assert lines["LOC"] == ["LOC", "0.0000", "0.0000", "0.0000", "1", "0"]
  assert lines["micro"] == ["micro", "avg", "0.6667", "0.5000", "0.5714", "4", "3"]
  assert "7 tokens" in text and "0.7143" in text


# --- SQuAD ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalized", [
    ("The  Cat!", "cat"),
    ("  A an THE apple, banana... ", "apple banana"),
    ("The theater", "theater"),  # articles only as whole words
    ("don't", "dont"),
    ("the-cat", "thecat"),  # punctuation goes first, leaving no article to remove
    ("¡Olé!", "¡olé"),  # only ASCII punctuation (string.punctuation) is removed
])
def test_normalize_answer(raw, normalized):
  assert metrics.normalize_answer(raw) == normalized


def test_exact_match_and_f1():
  assert metrics.exact_match("the Cat.", "cat") == 1.0
  assert metrics.exact_match("cats", "cat") == 0.0
  # [quick brown fox] vs [quick fox jumped]: 2 shared, P = R = F1 = 2/3.
  assert metrics.f1("the quick brown fox", "a quick fox jumped") == pytest.approx(2 / 3)
  # [red red car] vs [red car park lot]: "red" counts once (min of 2 and 1) + "car" = 2 shared;
  # P = 2/3, R = 2/4, F1 = (2/3) / (7/6) = 4/7.
  assert metrics.f1("red red car", "red car park lot") == pytest.approx(4 / 7)
  assert metrics.f1("dog", "cat") == 0.0
  # v2.0: empty against empty is a match, empty against anything else is not.
  assert metrics.f1("", "") == 1.0 and metrics.f1("the", "") == 1.0
  assert metrics.f1("", "cat") == 0.0 and metrics.f1("cat", "") == 0.0
  assert metrics.exact_match("", "") == 1.0


def test_squad_scores_by_hand(caplog):
  references = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["Paris"], "q3": [],
                "q4": ["red car park lot"], "q5": ["x"]}
  predictions = {"q1": "Broncos", "q2": "paris!", "q3": "", "q4": "red red car", "extra": "y"}
  with caplog.at_level(logging.WARNING, logger="jaxft.tasks.metrics"):
    scores = metrics.squad_scores(predictions, references)
  assert "1 of 5 questions have no prediction" in caplog.text
  # EM per question: q1 1 ("the Broncos"), q2 1, q3 1 (unanswerable, abstained), q4 0, q5 missing 0.
  # F1: 1, 1, 1, 4/7, 0.  Means: EM 3/5, F1 (3 + 4/7)/5 = 5/7.
  assert scores["exact_match"] == pytest.approx(60.0)
  assert scores["f1"] == pytest.approx(100 * 5 / 7)
  assert scores["total"] == 5
  # HasAns q1 q2 q4 q5: EM 2/4, F1 (2 + 4/7)/4 = 9/14.  NoAns q3: 1, 1.
  assert scores["HasAns_exact"] == pytest.approx(50.0)
  assert scores["HasAns_f1"] == pytest.approx(100 * 9 / 14)
  assert (scores["HasAns_total"], scores["NoAns_total"]) == (4, 1)
  assert scores["NoAns_exact"] == scores["NoAns_f1"] == 100.0


def test_squad_scores_take_the_best_gold_answer():
  # "Denver" vs [denver broncos]: P 1, R 1/2, F1 2/3; vs [broncos]: 0.  The max is 2/3.
  scores = metrics.squad_scores({"q": "Denver"}, {"q": ["Denver Broncos", "Broncos"]})
  assert scores == pytest.approx({"exact_match": 0.0, "f1": 100 * 2 / 3, "total": 1})
  # No HasAns/NoAns breakdown for a v1.1-style set.
  assert set(scores) == {"exact_match", "f1", "total"}


def test_squad_scores_edge_cases():
  # Missing prediction scores 0 even on an unanswerable question (where "" would score 100).
  assert metrics.squad_scores({}, {"q": []})["exact_match"] == 0.0
  assert metrics.squad_scores({"q": ""}, {"q": []})["f1"] == 100.0
  # v2.0 drops gold answers that normalise to nothing, so "the" is no target for "".
  assert metrics.squad_scores({"q": ""}, {"q": ["the", "cat"]})["exact_match"] == 0.0
