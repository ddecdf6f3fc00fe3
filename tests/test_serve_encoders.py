"""The server's encoder side (jaxft/serve/): classify / tag / answer equal jaxft.predict for the
same records, embeddings equal sentence-transformers' all-MiniLM-L6-v2 (and a transformers
BertModel's mean-pooled states for a fine-tuned run), bucket shapes compiled at warm-up only,
and the micro-batcher's batching, max_wait, queue limit and draining."""

import asyncio
import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest

from configs import common
from jaxft.inference import prediction
from jaxft.run import loader
from jaxft.serve import batching, encoders
from tests.helpers import FILLER, SPORT, TINY_BERT, TOKENIZER_FILES

# Few shapes (each compiles once per test): 4-row batches of 32 or 64 (the row length) tokens.
BUCKETS = dict(max_batch=4, batch_buckets=(4,), seq_buckets=(32,))
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
TOPICS = ["money", "sport", "weather"]


def _save_head(path, cls_name: str, labels=None, seed: int = 0) -> str:
  """A random-init transformers BertFor* directory with all-MiniLM-L6-v2's tokenizer."""
  import torch  # heavy, only to build the reference model
  import transformers

  torch.manual_seed(seed)
  extra = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
           "num_labels": len(labels)} if labels else {}
  config = transformers.BertConfig(**TINY_BERT, initializer_range=0.2, **extra)
  getattr(transformers, cls_name)(config).save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(common.minilm_dir(), name), path)
  return str(path)


def _texts(n: int, seed: int) -> list[str]:
  """Texts of 1 to ~90 words: every sequence bucket, and some cut at the row length (64)."""
  rng = np.random.default_rng(seed)
  words = SPORT + FILLER + ["Paris", "John", "Smith", "Zürich", "naïve"]
  return [" ".join(rng.choice(words, size=int(rng.choice([1, 3, 8, 20, 40, 90]))))
          for _ in range(n)]


def _open(path):
  run = loader.open_run(path, seq_len=64)
  with run.task.config.unlocked():  # jaxft.predict's reference batches: small, one compile
    run.task.config.eval_batch_size = 8
  return run


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  return _open(_save_head(tmp_path_factory.mktemp("cls"), "BertForSequenceClassification",
                          TOPICS))


@pytest.fixture(scope="module")
def classifier_service(classifier):
  """One started service of the classifier for the tests that only submit to it."""
  service = _started(classifier)
  yield service
  service.stop()


def _serve(service, endpoint, chunks):
  """Each chunk submitted as its own request, all concurrently from asyncio tasks."""
  async def main():
    return await asyncio.gather(*(service.submit(endpoint, c) for c in chunks))
  return [r for rows in asyncio.run(main()) for r in rows]


def _chunks(items, sizes=(1, 3, 2, 5)):
  out, i, k = [], 0, 0
  while i < len(items):
    out.append(items[i:i + sizes[k % len(sizes)]])
    i, k = i + sizes[k % len(sizes)], k + 1
  return out


def _started(run, **kwargs):
  service = encoders.make_encoder_service(run, **{**BUCKETS, "max_wait_ms": 20.0, **kwargs})
  service.start()
  return service


def test_classify_equals_predict(classifier, classifier_service):
  records = [{"text": t} for t in _texts(14, seed=1)]
  assert classifier_service.endpoints == ("classify", "embeddings")
  served = _serve(classifier_service, "classify", _chunks(records))
  expected = prediction.predict(classifier.task, classifier.variables, records)
  first = [e["probabilities"][TOPICS[0]] for e in expected]
  assert max(first) - min(first) > 0.01  # the texts' probabilities differ: a real comparison
  for got, want in zip(served, expected, strict=True):
    assert got["text"] == want["text"] and got["label"] == want["label"]
    assert got["probabilities"].keys() == want["probabilities"].keys()
    np.testing.assert_allclose(list(got["probabilities"].values()),
                               list(want["probabilities"].values()), atol=1e-5)


def test_tag_equals_predict(tmp_path):
  run = _open(_save_head(tmp_path, "BertForTokenClassification", TAGS))
  records = [{"text": t} for t in _texts(10, seed=2)]
  service = _started(run)
  try:
    assert service.endpoints == ("tag", "embeddings")
    served = _serve(service, "tag", _chunks(records))
  finally:
    service.stop()
  expected = prediction.predict(run.task, run.variables, records)
  assert sum(len(e["entities"]) for e in expected) > 3  # spans with offsets are compared
  assert served == expected


def test_answer_equals_predict_across_windows(tmp_path):
  run = _open(_save_head(tmp_path, "BertForQuestionAnswering"))
  with run.config.unlocked():  # short windows: long contexts are scored in several
    run.config.data.doc_stride, run.config.data.max_question_len = 16, 16
  rng = np.random.default_rng(3)
  records = []
  for i in range(8):
    filler = " ".join(rng.choice(FILLER, size=int(rng.choice([4, 30, 120]))))
    record = {"question": "where was the meeting held ?",
              "context": f"{filler} the meeting was held in Paris . {filler}"}
    if i % 2:
      record["id"] = f"q{i}"
    records.append(record)
  features = run.task.prediction_features(run.task.prediction_inputs(records))
  assert len(features["inputs"]) > len(records) + 4  # several windows per long context
  service = _started(run)
  try:
    assert service.endpoints == ("answer", "embeddings")
    chunks = [records[:3], records[3:4], records[4:]]  # ids default to the index per request
    served = _serve(service, "answer", chunks)
  finally:
    service.stop()
  expected = [p for c in chunks for p in prediction.predict(run.task, run.variables, c)]
  assert [p["id"] for p in served] == ["0", "q1", "2", "q3", "0", "q5", "2", "q7"]
  for got, want in zip(served, expected, strict=True):
    assert {k: got[k] for k in ("id", "answer", "start", "end")} == {
        k: want[k] for k in ("id", "answer", "start", "end")}
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-4)


def test_embeddings_equal_sentence_transformers():
  from sentence_transformers import SentenceTransformer  # the reference pipeline (torch)

  texts = ["A man is eating food.", "Zürich's naïve café, déjà vu!", "x",
           " ".join(["the quick brown fox jumps over the lazy dog"] * 40)]  # > 256 tokens: cut
  service = encoders.make_encoder_service(common.minilm_dir(), max_batch=4, batch_buckets=(4,),
                                          seq_buckets=(32,))
  service.start()
  try:
    assert service.endpoints == ("embeddings",)
    served = _serve(service, "embeddings", [[{"text": t} for t in texts[:2]],
                                            [{"text": t} for t in texts[2:]]])
  finally:
    service.stop()
  got = np.asarray([s["embedding"] for s in served])
  reference = SentenceTransformer(common.minilm_dir(), device="cpu")
  want = reference.encode(texts, normalize_embeddings=True)
  assert got.shape == (4, 384)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_embeddings_of_a_classification_run_are_its_backbone(classifier, classifier_service):
  import torch  # the reference backbone
  import transformers

  texts = _texts(5, seed=4)
  got = np.asarray([r["embedding"] for r in _serve(
      classifier_service, "embeddings", [[{"text": t}] for t in texts])])
  model = transformers.BertForSequenceClassification.from_pretrained(classifier.path).eval()
  tok = transformers.AutoTokenizer.from_pretrained(classifier.path)
  batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
  with torch.no_grad():
    hidden = model.bert(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  mean = (hidden * mask).sum(1) / mask.sum(1)
  want = torch.nn.functional.normalize(mean, dim=-1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_burst_compiles_nothing_after_warmup(classifier):
  service = encoders.make_encoder_service(classifier, max_batch=4, batch_buckets=(2, 4),
                                          seq_buckets=(32,), max_wait_ms=10.0)
  service.warmup()
  shapes = service.compiled_shapes()
  assert shapes["classify"] == [(b, s) for b in (2, 4) for s in (32, 64)]
  assert service.cache_sizes() == {k: len(v) for k, v in shapes.items()}
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  texts = _texts(40, seed=5)
  service.start()
  try:
    async def burst():
      jobs = []
      for i in range(0, 40, 3):  # varied request sizes and lengths, two endpoints interleaved
        endpoint = "classify" if i % 2 else "embeddings"
        jobs.append(service.submit(endpoint, [{"text": t} for t in texts[i:i + 1 + i % 3]]))
      return await asyncio.gather(*jobs)
    results = asyncio.run(burst())
    burst_compiles = list(compiles)
    jax.jit(lambda x: x * 3)(np.arange(7.0))  # the listener does see a compilation
  finally:
    service.stop()
    jax.monitoring.unregister_event_duration_listener(listener)
  assert [e for e in burst_compiles if "backend_compile" in e] == []
  assert [e for e in compiles if "backend_compile" in e] != []
  assert sum(len(r) for r in results) == sum(1 + i % 3 for i in range(0, 40, 3))
  assert service.cache_sizes() == {k: len(v) for k, v in shapes.items()}
  stats = service.stats()
  assert stats["items_done"] == sum(len(r) for r in results)
  assert stats["batches"] < len(results)  # concurrent requests shared batches
  assert 0 < stats["last_occupancy"] <= 1 and stats["queue_depth"] == 0


def test_bad_items_name_the_field(classifier):
  service = encoders.make_encoder_service(classifier, **BUCKETS)  # never started
  cases = [([{"text": ""}], r"items\[0\]\.text is empty"),
           ([{"text": "ok"}, {"txt": "a"}], r"items\[1\] lacks the field 'text'"),
           ([{"text": 3}], r"items\[0\]\.text is a int"),
           ([], "no inputs"), ("hello", "must be a list")]
  for items, message in cases:
    with pytest.raises(ValueError, match=message):
      service.check("classify", items)
  with pytest.raises(ValueError, match="serves classify, embeddings, not 'answer'"):
    service.check("answer", [{"question": "q", "context": "c"}])
  with pytest.raises(batching.Stopped):  # not started
    service.submit_future("classify", [{"text": "ok"}])


# -- the micro-batcher alone (a host function, no device) --------------------------------------

def _recording(calls, gate=None):
  def process(key, items):
    calls.append((key, list(items), time.monotonic()))
    if gate is not None:
      gate.wait(10)
    return [f"{key}:{x}" for x in items]
  return process


def test_batcher_groups_concurrent_requests_per_key():
  calls = []
  b = batching.MicroBatcher(_recording(calls), max_batch=4, max_wait_ms=300, max_queue=16)
  b.start()
  start = time.monotonic()
  futures = [b.submit_future("a", [i]) for i in range(6)] + [b.submit_future("b", [9, 8])]
  results = [f.result(5) for f in futures]
  b.stop()
  assert results == [[f"a:{i}"] for i in range(6)] + [["b:9", "b:8"]]
  assert [(k, items) for k, items, _ in calls] == [("a", [0, 1, 2, 3]), ("a", [4, 5]),
                                                   ("b", [9, 8])]
  assert calls[0][2] - start < 0.25  # a full batch does not wait for max_wait
  assert calls[1][2] - start >= 0.28  # a partial one waits max_wait for more items


def test_batcher_lone_item_waits_max_wait_only():
  calls = []
  b = batching.MicroBatcher(_recording(calls), max_batch=8, max_wait_ms=100, max_queue=8)
  b.start()

  async def one():
    start = time.monotonic()
    out = await b.submit("k", ["x"])
    return out, time.monotonic() - start
  out, waited = asyncio.run(one())
  b.stop()
  assert out == ["k:x"] and 0.09 <= waited < 1.0


def test_batcher_queue_limit_and_drain():
  calls, gate = [], threading.Event()
  b = batching.MicroBatcher(_recording(calls, gate), max_batch=2, max_wait_ms=0, max_queue=4)
  b.start()
  first = b.submit_future("k", [0, 1])
  while not calls:  # the worker holds the first batch; the queue is empty again
    time.sleep(0.005)
  queued = [b.submit_future("k", [2, 3]), b.submit_future("k", [4]), b.submit_future("k", [5])]
  assert b.stats()["queue_depth"] == 4
  with pytest.raises(batching.QueueFull, match="4 inputs are queued"):
    b.submit_future("k", [6])
  with pytest.raises(ValueError, match="more than the server's queue"):
    b.submit_future("k", list(range(5)))
  stopper = threading.Thread(target=b.stop, kwargs={"drain": True})
  stopper.start()
  time.sleep(0.05)
  with pytest.raises(batching.Stopped):
    b.submit_future("k", [7])
  gate.set()
  stopper.join(10)
  assert first.result(0) == ["k:0", "k:1"]
  assert [f.result(0) for f in queued] == [["k:2", "k:3"], ["k:4"], ["k:5"]]


def test_batcher_stop_without_drain_fails_queued_and_errors_reach_requests():
  calls, gate = [], threading.Event()
  b = batching.MicroBatcher(_recording(calls, gate), max_batch=1, max_wait_ms=0, max_queue=4)
  b.start()
  running = b.submit_future("k", [0])
  while not calls:
    time.sleep(0.005)
  waiting = b.submit_future("k", [1])
  stopper = threading.Thread(target=b.stop, kwargs={"drain": False})
  stopper.start()
  with pytest.raises(batching.Stopped):
    waiting.result(5)
  gate.set()
  stopper.join(10)
  assert running.result(0) == ["k:0"] and len(calls) == 1

  def broken(key, items):
    raise RuntimeError("device fell over")
  b = batching.MicroBatcher(broken, max_batch=2, max_wait_ms=0, max_queue=4)
  b.start()
  with pytest.raises(RuntimeError, match="device fell over"):
    b.submit_future("k", [1]).result(5)
  b.stop()
