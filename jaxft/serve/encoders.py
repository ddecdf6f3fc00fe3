"""The encoder side of the server: /v1/classify, /v1/tag, /v1/answer and /v1/embeddings, each
an endpoint of one EncoderService that groups concurrent requests' items into device batches
(jaxft/serve/batching.py) of fixed bucket shapes compiled at start-up (jaxft/serve/buckets.py).

The task endpoints run jaxft.predict's own pieces (task.prediction_inputs ->
prediction_features -> the task's eval_outputs, jitted -> task.predictions), so a served
prediction is predict's for the same record: the same keys, truncation (the run's seq_len;
QA: predict's doc-stride windows, every window of a long context scored) and post-processing.
Rows are never packed here (a packed run serves padded rows, which its tasks score alike).
"""

import concurrent.futures
import copy
from collections.abc import Sequence

from jaxft.inference import ensemble
from jaxft.run import loader
from jaxft.serve import buckets as buckets_lib
from jaxft.serve import embeddings
from jaxft.serve.batching import MicroBatcher, QueueFull, Stopped
from jaxft.serve.items import check_items

__all__ = ["EncoderService", "QueueFull", "Stopped", "TaskEndpoint", "make_encoder_service"]

# The task a run was trained for -> the endpoint that serves its predictions.
TASK_ENDPOINTS = {"classification": "classify", "token_classification": "tag",
                  "question_answering": "answer"}
_ID = "_id"  # the id a prediction answers with (predict's str(record.get("id", index)))


class _TruncatingCopies:
  """A tokenizer whose private_copy(max_len) is made once per length and reused: a copy is a
  re-parse of the whole tokenizer (~20-50 ms for a BERT vocabulary), which every batch's
  featurisation would otherwise pay. Copies without a length are still made fresh: QA sets
  its own truncation on them."""

  def __init__(self, tokenizer):
    self._tokenizer, self._copies = tokenizer, {}

  def private_copy(self, max_len: int | None = None):
    if max_len is None:
      return self._tokenizer.private_copy()
    if max_len not in self._copies:
      self._copies[max_len] = self._tokenizer.private_copy(max_len)
    return self._copies[max_len]

  def __getattr__(self, name):
    return getattr(self._tokenizer, name)


class TaskEndpoint:
  """A labelled task's predictions (jaxft.predict's) over items with its prediction_fields."""

  def __init__(self, run: loader.Run, name: str, *, seq_buckets: Sequence[int],
               batch_buckets: Sequence[int]):
    task = copy.copy(run.task)  # a shallow copy: the run's own task keeps its packing
    task.packing = False
    task.tokenizer = _TruncatingCopies(run.task.tokenizer)  # the copy's own, not the run's
    self.task, self.name, self.fields = task, name, tuple(task.prediction_fields)
    self.runner = buckets_lib.BucketRunner(
        task.eval_outputs, run.variables, task.max_len, seq_buckets=seq_buckets,
        batch_buckets=batch_buckets, token_keys=(*buckets_lib.TOKEN_KEYS, *task.token_batch_keys),
        per_token_outputs=task.per_token_outputs)
    # Whether predictions name their input (QA's "id"): ids must then be unique per request.
    self._keyed = "id" in task.prediction_inputs([self._sample()])[0]

  def _sample(self) -> dict:
    return {field: "warm up" for field in self.fields}

  def check(self, items) -> list[dict]:
    """Items -> the records queued: the task's fields and the id the prediction answers with
    (the item's "id", else its index in the request, as predict numbers input lines)."""
    items = check_items(items, self.fields, self.name)
    out, seen = [], set()
    for i, item in enumerate(items):
      given = item.get("id", i)
      if not isinstance(given, (str, int)) or isinstance(given, bool):
        raise ValueError(f"{self.name}: items[{i}].id is a {type(given).__name__}; give a "
                         "string or an integer")
      key = str(given)
      if self._keyed and key in seen:
        raise ValueError(f"{self.name}: items[{i}].id {key!r} repeats another item's id in this "
                         "request; ids must be unique")
      seen.add(key)
      out.append({**{f: item[f] for f in self.fields}, _ID: key})
    return out

  def warmup(self) -> None:
    features = self.task.prediction_features(self.task.prediction_inputs([self._sample()]))
    self.runner.warmup(self.task.rows(features))

  def __call__(self, records: list[dict]) -> list[dict]:
    # Ids unique within the batch (several requests' items share it; QA keys windows by id).
    inputs = [{**{f: r[f] for f in self.fields}, "id": str(k)} for k, r in enumerate(records)]
    examples = self.task.prediction_inputs(inputs)
    features = self.task.prediction_features(examples)
    outputs = self.runner.run(self.task.rows(features))
    predictions = self.task.predictions(examples, features, [outputs])
    for prediction, record in zip(predictions, records, strict=True):
      if "id" in prediction:
        prediction["id"] = record[_ID]
    return predictions


class EncoderService:
  """Endpoints of one model behind one dynamic micro-batcher (one worker thread, so device
  calls never overlap)."""

  def __init__(self, endpoints: dict, *, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_queue: int = 256):
    if not endpoints:
      raise ValueError("an EncoderService needs at least one endpoint")
    self._endpoints = dict(endpoints)
    self._batcher = MicroBatcher(self._process, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                 max_queue=max_queue, name="encoder batcher")
    self.max_batch, self.max_queue = max_batch, max_queue
    self._last_runner = None
    self.warmed = False

  @property
  def endpoints(self) -> tuple[str, ...]:
    return tuple(self._endpoints)

  def warmup(self) -> None:
    """Compiles every endpoint's every bucket shape (before the server reports ready)."""
    for endpoint in self._endpoints.values():
      endpoint.warmup()
    self.warmed = True

  def start(self) -> None:
    self._batcher.start()

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Refuses new requests; `drain`: finishes the queued ones first, else fails them with
    Stopped."""
    self._batcher.stop(drain, timeout)

  def _endpoint(self, name: str):
    if name not in self._endpoints:
      raise ValueError(f"this model serves {', '.join(self._endpoints)}, not {name!r}")
    return self._endpoints[name]

  def check(self, endpoint: str, items) -> list[dict]:
    """The items as queued; ValueError (HTTP 400) naming the item and field of a bad one."""
    return self._endpoint(endpoint).check(items)

  def submit_future(self, endpoint: str, items) -> concurrent.futures.Future:
    """Checks and queues `items`; a future of their results, in order. Raises ValueError (bad
    items, or more than max_queue of them), QueueFull (the queue is full) or Stopped."""
    return self._batcher.submit_future(endpoint, self.check(endpoint, items))

  async def submit(self, endpoint: str, items) -> list[dict]:
    """One result per item (jaxft.predict's dict for the task endpoints, {"embedding": [...]}
    for embeddings), awaited from an asyncio handler; raises as submit_future does."""
    return await self._batcher.submit(endpoint, self.check(endpoint, items))

  def _process(self, name: str, records: list[dict]) -> list[dict]:
    endpoint = self._endpoints[name]
    results = endpoint(records)
    self._last_runner = endpoint.runner
    return results

  def stats(self) -> dict:
    """queue_depth (items waiting), batches (micro-batches run), items_done, last_batch_items,
    device_calls (bucketed calls, all endpoints), last_occupancy (real rows / bucket rows of
    the last batch), last_token_occupancy (real tokens / bucket tokens of the last batch)."""
    out = self._batcher.stats()
    out["device_calls"] = sum(e.runner.device_calls for e in self._endpoints.values())
    runner = self._last_runner
    (rows, rows_cap), (tokens, tokens_cap) = ((runner.last_rows, runner.last_tokens)
                                              if runner else ((0, 0), (0, 0)))
    out["last_occupancy"] = rows / rows_cap if rows_cap else 0.0
    out["last_token_occupancy"] = tokens / tokens_cap if tokens_cap else 0.0
    return out

  def compiled_shapes(self) -> dict[str, list[tuple[int, int]]]:
    """{endpoint: [(batch rows, sequence length), ...]} that warmup compiled."""
    return {name: sorted(e.runner.compiled) for name, e in self._endpoints.items()}

  def cache_sizes(self) -> dict[str, int]:
    """{endpoint: programs its jitted function holds} (jax's count; grows on a new shape)."""
    return {name: e.runner.cache_size() for name, e in self._endpoints.items()}


def _seq_buckets(given: Sequence[int] | None, max_len: int) -> tuple[int, ...]:
  """The given buckets below the row length, plus the row length (every row must fit)."""
  if given is None:
    return buckets_lib.default_seq_buckets(max_len)
  if any(int(b) < 1 for b in given):
    raise ValueError(f"seq_buckets={tuple(given)} must be positive lengths")
  return (*sorted({int(b) for b in given if int(b) < max_len}), max_len)


def _run_endpoints(run: loader.Run, **buckets) -> dict:
  found = {}
  name = TASK_ENDPOINTS.get(run.task.name)
  if name and run.task.prediction_fields:
    found[name] = TaskEndpoint(run, name, **buckets)
  # An ensemble serves its members' combined predictions; embeddings are one model's vectors.
  embedder = (None if isinstance(run, ensemble.Ensemble)
              else embeddings.from_run(run, **buckets))
  if embedder is not None:
    found[embeddings.ENDPOINT] = embedder
  if not found:
    raise ValueError(f"{run.path} holds a {run.task.name} model of family "
                     f"{run.config.model.get('family', 'gpt2')!r}; the encoder endpoints serve "
                     "classification, token classification and QA runs, and embeddings of "
                     "BERT-family models")
  return found


def make_encoder_service(run_or_path, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                         max_queue: int = 256, seq_buckets: Sequence[int] | None = None,
                         batch_buckets: Sequence[int] | None = None,
                         seq_len: int | None = None) -> EncoderService:
  """The encoder endpoints of a model: an opened loader.Run, or a path (a jaxft workdir, a
  Hugging Face directory of a task class, or a headless Hugging Face BertModel directory such
  as all-MiniLM-L6-v2, which serves embeddings only).

  A classification / token-classification / QA run serves classify / tag / answer, and a
  BERT-family run also embeddings (its backbone). `seq_buckets`: sequence lengths compiled
  (default 32, 64, ... and the row length, which is always one; larger ones are dropped);
  `batch_buckets`: batch row counts compiled, ending at max_batch (default 1, 4, 16, ...,
  max_batch). `seq_len` sets the row length of a Hugging Face directory (default: the task's,
  or sentence-transformers' max_seq_length for a headless BertModel)."""
  batch_buckets = buckets_lib.check_buckets(
      "batch_buckets", batch_buckets or buckets_lib.default_batch_buckets(max_batch), max_batch,
      "max_batch")
  if embeddings.is_headless_bert(run_or_path):
    length = embeddings.hf_dir_max_len(run_or_path, seq_len)
    found = {embeddings.ENDPOINT: embeddings.from_hf_dir(
        run_or_path, length, seq_buckets=_seq_buckets(seq_buckets, length),
        batch_buckets=batch_buckets)}
  else:
    run = (loader.open_run(run_or_path, seq_len=seq_len) if isinstance(run_or_path, str)
           else run_or_path)
    found = _run_endpoints(run, seq_buckets=_seq_buckets(seq_buckets, int(run.config.seq_len)),
                           batch_buckets=batch_buckets)
  return EncoderService(found, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
