"""Ensembles of fine-tuned runs (jaxft/inference/ensemble.py): mean = the numpy average of each
member's own predict probabilities, vote = a hand-counted majority (ties to the higher mean),
one member = that member, labels in another order mapped by name, disagreeing members refused
naming both, evaluate's metrics from the combined predictions, and the server's /v1/classify.
NER: per-token mean / vote against numpy over the members' own logits, through evaluate's
predictions, entity scores and loss. QA: per-window start / end probabilities against numpy's
average of the members' own eval outputs, and the answers single-model post-processing gives.

Members are tiny random BERT heads (transformers, several seeds) saved as jaxft adapter
directories (config.json + labels.json + adapter.safetensors), which open_run opens as runs."""

import json

import jax
import numpy as np
import pytest
import sklearn.metrics

from configs import finetune
from jaxft import tasks, trees
from jaxft.data import qa_features
from jaxft.inference import ensemble, prediction
from jaxft.run import checkpoint, evaluation, loader
from jaxft.run import workdir as workdir_lib
from jaxft.serve.app import Settings, create_app
from jaxft.tasks import metrics, token_classification
from tests.helpers import FILLER, MONEY, SPORT, eval_outputs, write_conll, write_csv, write_squad
from tests.test_serve_encoder_routes import post_all
from tests.test_serve_encoders import TOPICS, _save_head, _texts

SEQ_LEN = 32


def _rows(n, seed):
  """Texts with a random topic label each (the members are untrained: labels are data only)."""
  rng = np.random.default_rng(seed)
  words = SPORT + MONEY + FILLER
  return [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 25)))),
           "label": str(rng.choice(TOPICS))} for _ in range(n)]


def _member(root, name, params, labels, config):
  """A jaxft adapter directory holding `params` (every variable trainable: no PEFT)."""
  out = str(root / name)
  checkpoint.save_adapter(out, str(root / "nowhere"), params)
  workdir_lib.save_config(out, config)
  workdir_lib.save_labels(out, labels)
  return out


def _spread_head(hf_dir, seed):
  """A random head whose logits are centred over the test texts: a random init's pooled
  vectors share one direction, so each member would otherwise give every text one label;
  centred, members disagree text by text (and votes split 1-1-1)."""
  import torch  # heavy, only to build the reference models
  import transformers

  model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
  tokenizer = transformers.BertTokenizerFast.from_pretrained(hf_dir)
  batch = tokenizer(_texts(24, seed=5), truncation=True, max_length=SEQ_LEN, padding=True,
                    return_tensors="pt")
  with torch.no_grad():
    pooled = model.bert(**batch).pooler_output
    weight = torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (3, pooled.shape[1])))
    model.classifier.weight.copy_(weight)
    model.classifier.bias.copy_(-(pooled @ model.classifier.weight.T).mean(0))
  model.save_pretrained(hf_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: opened run}: a, b, c (seeds 0-2) and a_perm (a's model, labels in another order)."""
  root = tmp_path_factory.mktemp("ensemble")
  paths = {}
  for seed, name in enumerate("abc"):
    hf_dir = _save_head(root / f"hf_{name}", "BertForSequenceClassification", TOPICS, seed)
    config = finetune.get_config("classification")
    config.update({"init_from": hf_dir, "seq_len": SEQ_LEN, "eval_batch_size": 16})
    config.data.update({"dataset": "", "train": write_csv(root / "train.csv", _rows(30, 0)),
                        "test": write_csv(root / "test.csv", _rows(40, 1)),
                        "data_dir": str(root / "tfds")})
    loader.resolve(config)
    _spread_head(hf_dir, seed)
    params = loader.open_run(hf_dir, seq_len=SEQ_LEN).variables
    paths[name] = _member(root, name, params, TOPICS, config)
    if name == "a":  # the same function with its classes listed in another order
      perm = [2, 0, 1]
      flat = trees.flat(params)
      flat = {k: v[..., perm] if "classifier" in k else v for k, v in flat.items()}
      paths["a_perm"] = _member(root, "a_perm", trees.unflat(flat), [TOPICS[i] for i in perm],
                                config)
  return {name: loader.open_run(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def records():
  return [{"text": t} for t in _texts(24, seed=5)]


@pytest.fixture(scope="module")
def own(runs, records):
  """Each member's own predict probabilities [N, 3] in TOPICS order."""
  out = {}
  for name in "abc":
    run = runs[name]
    rows = prediction.predict(run.task, run.variables, records)
    out[name] = np.array([[r["probabilities"][t] for t in TOPICS] for r in rows])
  return out


def _probs(rows):
  return np.array([[r["probabilities"][t] for t in TOPICS] for r in rows])


def _predict(runs, names, mode, records):
  ens = ensemble.make_ensemble([runs[n] for n in names], mode)
  return prediction.predict(ens.task, ens.variables, records)


def test_mean_is_the_average_of_members_and_one_member_is_itself(runs, own, records):
  rows = _predict(runs, "abc", "mean", records)
  want = (own["a"] + own["b"] + own["c"]) / 3
  np.testing.assert_allclose(_probs(rows), want, atol=3e-6)
  assert [r["label"] for r in rows] == [TOPICS[i] for i in want.argmax(1)]
  assert not np.allclose(own["a"], own["b"], atol=0.05)  # the members really differ
  assert rows[0].keys() == {"text", "label", "probabilities"}  # predict's own format

  alone = _predict(runs, ["a"], "mean", records)
  np.testing.assert_allclose(_probs(alone), own["a"], atol=2e-6)
  assert [r["label"] for r in alone] == [TOPICS[i] for i in own["a"].argmax(1)]
  # Labels listed in another order are mapped by name: a_perm is a's model with its classes
  # permuted, so with b and c it gives the same average as a does.
  assert runs["a_perm"].labels != TOPICS
  mixed = _predict(runs, ["a_perm", "b", "c"], "mean", records)
  np.testing.assert_allclose(_probs(mixed), want, atol=3e-6)
  assert list(mixed[0]["probabilities"]) == runs["a_perm"].labels  # the first member's order


def test_vote_is_the_majority_ties_to_the_higher_mean(runs, own, records):
  rows = _predict(runs, "abc", "vote", records)
  mean = (own["a"] + own["b"] + own["c"]) / 3
  votes = sum(np.eye(3)[own[n].argmax(1)] for n in "abc")
  expected, ties = [], 0
  for v, m in zip(votes, mean):
    top = [i for i in range(3) if v[i] == v.max()]
    ties += len(top) > 1
    expected.append(TOPICS[max(top, key=lambda i: m[i])])
  assert [r["label"] for r in rows] == expected
  assert ties > 0  # a 1-1-1 split was decided by the mean
  assert expected != [TOPICS[i] for i in mean.argmax(1)]  # vote and mean differ somewhere
  # The distribution reported: (votes + mean) / (members + 1).
  np.testing.assert_allclose(_probs(rows), (votes + mean) / 4, atol=3e-6)


def test_members_that_disagree_are_refused(runs):
  a = runs["a"]
  other = a.config.copy_and_resolve_references()
  with pytest.raises(ValueError, match=r"label set.*only in the first: \['weather'\], only "
                     r"in the other: \['rain'\]"):
    ensemble.make_ensemble([a, loader.Run("other", other, tasks.make_task(
        other, labels=["money", "sport", "rain"]), {})])
  ner = a.config.copy_and_resolve_references()
  ner.task = "token_classification"
  with pytest.raises(ValueError, match=f"disagree on config.task: {a.path} has "
                     "'classification', ner has 'token_classification'"):
    ensemble.make_ensemble([a, loader.Run("ner", ner, tasks.make_task(ner, labels=TOPICS), {})])
  longer = a.config.copy_and_resolve_references()
  longer.seq_len = 64
  with pytest.raises(ValueError, match="config.seq_len: .* has 32, long has 64"):
    ensemble.make_ensemble([a, loader.Run("long", longer, tasks.make_task(longer, TOPICS), {})])
  with pytest.raises(ValueError, match="--ensemble='median'"):
    ensemble.make_ensemble([a], "median")
  with pytest.raises(ValueError, match=r"--workdir repeats \['x'\]"):
    ensemble.open_ensemble(["x", "y", "x"])
  assert ensemble.split_paths(["a,b", " c ", "d,"]) == ["a", "b", "c", "d"]  # the CLIs' flags


def test_evaluate_scores_the_combined_predictions(runs, tmp_path):
  members = [runs[n] for n in "abc"]
  report = ensemble.evaluate(ensemble.make_ensemble(members, "mean"), "test", str(tmp_path))
  y_true = members[0].task.features("test")["labels"]
  probs = []
  for run in members:  # each member's own logits over the test split
    out = _test_logits(run)
    e = np.exp(out - out.max(1, keepdims=True))
    probs.append(e / e.sum(1, keepdims=True))
  mean = np.mean(probs, axis=0)
  y_pred = mean.argmax(1)
  assert report["accuracy"] == pytest.approx(np.mean(y_pred == y_true), abs=1e-9)
  assert report["macro"]["f1"] == pytest.approx(
      sklearn.metrics.f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2],
                               zero_division=0), abs=1e-6)
  nll = -np.mean(np.log(mean[np.arange(len(y_true)), y_true]))
  assert report["loss"] == pytest.approx(nll, rel=1e-4)
  assert report["support"] == len(y_true) == 40
  assert json.loads((tmp_path / "report_test.json").read_text()) == report
  assert json.loads((tmp_path / "ensemble.json").read_text())["members"] == [
      m.path for m in members]


def _test_logits(run):
  """A member's own logits [N, 3] over the test split."""
  outputs = evaluation.run_batches(evaluation.single_device_eval(run.task),
                                   run.task.eval_batches("test"), run.variables)
  return run.task.gather(outputs, "logits", len(run.task.features("test")["labels"]))


def test_server_classify_serves_the_ensemble(runs, own, records):
  paths = ",".join(runs[n].path for n in "abc")
  app = create_app(Settings(workdir=paths, encoder_max_batch=1, max_items=8,
                            encoder_max_wait_ms=20.0), load_in_background=False)
  try:
    server = app.state.server
    assert server.load_error is None and server.routes() == ["/v1/classify"]
    texts = [r["text"] for r in records[:8]]
    (r,) = post_all(app, "/v1/classify", [{"texts": texts}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "a+b+c"
    want = (own["a"] + own["b"] + own["c"])[:8] / 3
    np.testing.assert_allclose(_probs(body["results"]), want, atol=3e-6)
    (e,) = post_all(app, "/v1/embeddings", [{"input": "a match"}])
    assert e.status_code == 404  # one model's vectors: not served for an ensemble
  finally:
    app.state.server.stop()


# -- token classification (NER) and extractive QA ---------------------------------------------
# Members: tiny random BertForTokenClassification / BertForQuestionAnswering heads (seeds 0, 1,
# 2), opened as jaxft adapter runs on CoNLL / SQuAD files. References are numpy over each
# member's own outputs: its logits (NER) or its eval_outputs' start / end logits (QA).

NER_TAGS = ["B-LOC", "B-PER", "I-PER", "O"]  # write_conll's tags, sorted (the training order)


def _runs_of(root, variant, cls_name, labels, seeds, **fields):
  """Opened adapter runs of random `cls_name` heads, one per seed, on write_conll / write_squad
  data (train: 20 examples, test: fields' or 24)."""
  out = []
  for seed in seeds:
    hf_dir = _save_head(root / f"hf_{variant}{seed}", cls_name, labels, seed)
    config = finetune.get_config(variant)
    config.update({"init_from": hf_dir, "seq_len": SEQ_LEN, "eval_batch_size": 16})
    config.data.update({"data_dir": str(root / "tfds"), **fields})
    loader.resolve(config)
    params = loader.open_run(hf_dir, seq_len=SEQ_LEN).variables
    out.append(loader.open_run(_member(root, f"{variant}{seed}", params, labels, config)))
  return out


@pytest.fixture(scope="module")
def ner_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ner")
  return _runs_of(root, "ner", "BertForTokenClassification", NER_TAGS, (0, 1, 2),
                  train=write_conll(root / "train.conll", 20, 0),
                  test=write_conll(root / "test.conll", 24, 1))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ner_probs(run):
  """A member's own per-token probabilities [N, T, C] over the test split."""
  task = run.task
  outputs = evaluation.run_batches(jax.jit(lambda v, b: {"logits": task.logits(v, b)}),
                                   task.eval_batches("test"), run.variables)
  n = len(task.features("test")["inputs"])
  return _softmax(task.gather(outputs, "logits", n, per_token=True).astype(np.float64))


def _ner_check(ens, want, dist):
  """The ensemble's evaluate path over the test split: per-token predictions == `want` [N, T]
  at each word's first sub-token, entity scores from them, and the loss of `dist` [N, T, C]."""
  task = ens.task
  scores, outputs = evaluation.evaluate(task, evaluation.single_device_eval(task),
                                        task.eval_batches("test"), ens.variables, split="test")
  feats = task.features("test")
  first, labels = feats["first_token"], feats["labels"]
  words = first >= 0
  got = task.gather(outputs, "predictions", len(first))
  np.testing.assert_array_equal(got[words], want[words])
  gold = [e["tags"] for e in task.splits["test"]]
  pred = [token_classification.word_tags(first[i], want[i], len(gold[i]), NER_TAGS)
          for i in range(len(gold))]
  ref = metrics.entity_scores(gold, pred)
  for key in ("precision", "recall", "f1", "accuracy"):
    assert scores[key] == pytest.approx(ref[key], abs=1e-9), key
  gold_p = np.take_along_axis(dist, labels[..., None], -1)[..., 0][words]
  assert scores["loss"] == pytest.approx(-np.mean(np.log(gold_p)), rel=1e-4)
  return got


def test_ner_mean_and_vote_are_numpy_per_token(ner_runs):
  probs = [_ner_probs(r) for r in ner_runs]
  words = ner_runs[0].task.features("test")["first_token"] >= 0
  own = [p.argmax(-1)[words] for p in probs]
  assert np.mean(own[0] != own[1]) > 0.1  # the members disagree on many words
  # mean: the average of two members' softmax probabilities, argmax per token
  mean2 = (probs[0] + probs[1]) / 2
  got = _ner_check(ensemble.make_ensemble(ner_runs[:2], "mean"), mean2.argmax(-1), mean2)
  assert np.any(got[words] != own[0])  # not the first member alone
  # vote: three members; most votes wins, a tie (1-1-1) goes to the higher mean probability
  mean3 = sum(probs) / 3
  votes = sum(np.eye(len(NER_TAGS))[p.argmax(-1)] for p in probs)
  want = np.zeros(words.shape, int)
  ties = 0
  for i, t in zip(*np.nonzero(words)):
    top = [c for c in range(len(NER_TAGS)) if votes[i, t, c] == votes[i, t].max()]
    ties += len(top) > 1
    want[i, t] = max(top, key=lambda c: mean3[i, t, c])
  assert ties > 0
  assert np.any(want[words] != mean3.argmax(-1)[words])  # a 2-1 vote overrules the mean
  _ner_check(ensemble.make_ensemble(ner_runs, "vote"), want, (votes + mean3) / 4)


@pytest.fixture(scope="module")
def qa_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("qa")
  # seq_len 32, doc_stride 8: most contexts span several windows
  return _runs_of(root, "squad", "BertForQuestionAnswering", None, (0, 1),
                  train=write_squad(root / "train.json", 10, 0),
                  test=write_squad(root / "test.json", 16, 1), doc_stride=8,
                  max_question_len=12)


def test_qa_mean_averages_window_probabilities_and_answers_from_them(qa_runs):
  lead = qa_runs[0].task
  feats = lead.features("test")
  windows = len(feats["inputs"])
  real = feats["segment_ids"] > 0  # each window's positions (question, context, specials)
  examples = list(lead.splits["test"])
  assert windows > len(examples)  # long contexts are cut into several windows

  def window_probs(logits):  # softmax over each window's real positions
    return _softmax(np.where(real, logits.astype(np.float64), -np.inf))

  own, own_answers = {}, []
  for run in qa_runs:  # each member's own eval_outputs: raw start / end logits per window
    outputs = eval_outputs(run.task, run.variables, run.task.eval_batches("test"))
    own_answers.append(run.task._answers(examples, feats, outputs))
    for key in ("start", "end"):
      own.setdefault(key, []).append(window_probs(run.task.gather(outputs, key, windows)))
  mean = {k: (v[0] + v[1]) / 2 for k, v in own.items()}
  assert not np.allclose(own["start"][0][real], own["start"][1][real], atol=0.01)

  task = ensemble.make_ensemble(qa_runs, "mean").task
  scores, outputs = evaluation.evaluate(task, evaluation.single_device_eval(task),
                                        task.eval_batches("test"), [r.variables for r in qa_runs],
                                        split="test")
  for key in ("start", "end"):  # the combined log-probabilities, per window position
    got = np.exp(task.gather(outputs, key, windows))
    np.testing.assert_allclose(got[real], mean[key][real], atol=2e-6)
  # The answers: single-model post-processing (the lead's own task) on the averaged
  # probabilities' logs.
  averaged = [{k: np.log(np.maximum(mean[k], 1e-30)) for k in mean}]
  want = lead._answers(examples, feats, averaged)
  got = task._answers(examples, feats, outputs)
  assert {k: a["text"] for k, a in got.items()} == {k: a["text"] for k, a in want.items()}
  assert {k: a["text"] for k, a in got.items()} != {k: a["text"]
                                                    for k, a in own_answers[0].items()}
  ref = metrics.squad_scores({k: a["text"] for k, a in want.items()},
                             qa_features.references(examples))
  assert scores["exact_match"] == pytest.approx(ref["exact_match"])
  assert scores["f1"] == pytest.approx(ref["f1"])
  # The loss: the mean over windows of the start and end cross-entropies of the averages.
  at = {k: feats[f"{k}_positions"] for k in mean}
  nll = -0.5 * sum(np.log(mean[k][np.arange(windows), at[k]]) for k in mean)
  assert scores["loss"] == pytest.approx(np.mean(nll), rel=1e-4)
  with pytest.raises(ValueError, match="--ensemble=vote: QA answers are spans"):
    ensemble.make_ensemble(qa_runs, "vote")
