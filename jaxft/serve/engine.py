"""Continuous batching for generation: a fixed set of KV-cache slots decoded together.

A request is prefilled on its own (its prompt right-padded to the smallest of a few compiled
bucket lengths; the cache cursor is then set back to the prompt's end, so the padding is
overwritten by the tokens that follow) and its cache is written into a free slot. Between two
decode steps, new requests join and finished, cancelled or timed-out ones leave, so a short
request never waits for a long one. Every slot decodes every step (one [slots, 1] program; the
free slots' work is thrown away), so the compiled shapes are fixed at start-up: `warmup`
compiles each prefill bucket, the slot insert and the decode step, and nothing compiles after.

Each slot keeps its own cursor: the decode step is the model's one-row decode vmapped over the
slots, whose cache index becomes a vector. Sampling settings and seeds travel per slot as
arrays (`generation.sample_rows`), so a request draws the tokens `jaxft.generate` draws for its
prompt alone with the same seed; greedy requests get identical tokens.

The engine runs on one background thread; requests come from any thread (the server's event
loop) and receive their tokens through a callback.
"""

import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import generation
from jaxft.serve.batching import QueueFull  # one "queue full" (HTTP 429) for both engines

log = logging.getLogger("jaxft")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0


class Request:
  """One generation. `emit(kind, value)` is called from the engine thread: ("token", id) for
  each new token, then once ("done", finish_reason) with "stop" (an EOS id), "length"
  (max_tokens) or "cancelled" (cancel(): the client left, a stop string, a timeout)."""

  def __init__(self, prompt: list[int], params: SamplingParams,
               emit: Callable[[str, object], None]):
    self.prompt, self.params, self.emit = list(prompt), params, emit
    self.tokens: list[int] = []
    self.cancelled = False
    self.finish_reason: str | None = None

  def cancel(self) -> None:
    self.cancelled = True  # read by the engine thread between steps; the slot frees there


def _buckets(max_len: int) -> tuple[int, ...]:
  sizes = [16]
  while sizes[-1] * 2 < max_len:
    sizes.append(sizes[-1] * 2)
  return tuple(s for s in sizes if s < max_len) + (max_len,)


def _set_cursor(cache, position):
  """Every layer's cache cursor ("index") set to `position`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(position, x.dtype) if path[-1].key == "index" else x, cache)


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _prefill(model, variables, tokens, length, sampling, *, max_len: int):
  """tokens [1, P] (the prompt, then padding) -> (the slot's cache, the first new token)."""
  column = jnp.arange(tokens.shape[1])[None]
  segment_ids = (column < length).astype(jnp.int32)  # padding: segment 0, never attended to
  cache = generation.empty_cache(model, 1, max_len)

  def forward(module, tokens, positions, segment_ids):
    # Only the prompt's last position reaches the LM head (a 50k vocabulary costs a decode
    # step's worth of FLOPs per position).
    hidden = module.hidden(tokens, positions, segment_ids, deterministic=True, decode=True)
    return module.logits(jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1))

  logits, mutated = model.apply({**variables, "cache": cache}, tokens, column, segment_ids,
                                method=forward, mutable=["cache"])
  last = logits[0]  # [1, V]
  seed, temperature, top_k, top_p = sampling
  token = generation.sample_rows(last, seed[None], jnp.zeros((1,), jnp.int32),
                                 temperature[None], top_k[None], top_p[None])[0]
  return _set_cursor(mutated["cache"], length), token


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(caches, cache, slot):
  """Writes one request's cache (batch 1) into slot `slot` of the stacked caches."""
  return jax.tree.map(lambda all_, one: jax.lax.dynamic_update_index_in_dim(all_, one, slot, 0),
                      caches, cache)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnums=(2,))
def _decode(model, variables, caches, last, positions, seeds, steps, temperature, top_k, top_p):
  """One token for each slot of `caches` (the first W slots' caches, [W, ...]) from its last
  token/position/... [W] -> (caches, tokens [W])."""
  one = jnp.ones((1, 1), jnp.int32)

  def step(cache, token, position):
    logits, mutated = model.apply({**variables, "cache": cache}, token[None, None],
                                  position[None, None], one, deterministic=True, decode=True,
                                  mutable=["cache"])
    return mutated["cache"], logits[0, -1]

  caches, logits = jax.vmap(step)(caches, last, positions)
  return caches, generation.sample_rows(logits, seeds, steps, temperature, top_k, top_p)


# A step that decodes fewer slots than there are takes their caches out and puts them back in
# programs of their own: inside one program, XLA copied every slot's cache each step to write
# the few in place (151 MB a step for GPT-2 124M with 16 slots: 3x the step).
@functools.partial(jax.jit, static_argnames=("width",))
def _take_slots(caches, *, width: int):
  return jax.tree.map(lambda x: x[:width], caches)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_slots(caches, head):
  return jax.tree.map(lambda all_, h: jax.lax.dynamic_update_slice_in_dim(all_, h, 0, 0),
                      caches, head)


class GenerationEngine:
  """`slots` requests decoded together; at most `max_queue` waiting for a slot."""

  def __init__(self, model, variables, *, eos_ids, max_len: int, slots: int = 8,
               max_queue: int = 64):
    if slots < 1:
      raise ValueError(f"--slots={slots} must be >= 1")
    self.model, self.variables = model, variables
    self.eos_ids = frozenset(int(e) for e in eos_ids)
    self.max_len, self.slots, self.max_queue = int(max_len), int(slots), int(max_queue)
    self.buckets = _buckets(self.max_len)
    # Decode widths: the busy slots are the lowest free ones taken, so a few requests decode
    # only the first few slots instead of all of them.
    self.widths = tuple(w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256) if w < slots) + (slots,)
    self._pending: collections.deque[Request] = collections.deque()
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._running = False
    self._thread: threading.Thread | None = None
    self._active: list[Request | None] = [None] * slots
    self._host = {name: np.zeros(slots, dtype) for name, dtype in (
        ("last", np.int32), ("positions", np.int32), ("seeds", np.uint32), ("steps", np.int32),
        ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32))}
    one = generation.empty_cache(model, 1, self.max_len)
    self._caches = jax.tree.map(lambda x: jnp.zeros((slots, *x.shape), x.dtype), one)
    self.steps_run = 0
    self.tokens_generated = 0

  # -- the requests' side (any thread) ---------------------------------------------------------

  def check(self, prompt_len: int, max_tokens: int) -> str | None:
    """Why a request of this size cannot run (None: it can)."""
    if prompt_len + max_tokens > self.max_len:
      return (f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
              f"more than the {self.max_len} tokens a request may hold (--max_len); lower "
              f"max_tokens to at most {max(self.max_len - prompt_len, 0)} or shorten the prompt")
    return None

  def submit(self, request: Request) -> None:
    problem = self.check(len(request.prompt), request.params.max_tokens)
    if problem:
      raise ValueError(problem)
    if not request.prompt:
      raise ValueError("the prompt has no tokens")
    with self._lock:
      if len(self._pending) >= self.max_queue:
        raise QueueFull(f"{len(self._pending)} requests are already waiting (--max_queue="
                        f"{self.max_queue}); retry later")
      self._pending.append(request)
    self._wake.set()

  def stats(self) -> dict:
    active = sum(r is not None for r in self._active)
    return {"queue_depth": len(self._pending), "active_slots": active, "slots": self.slots,
            "occupancy": active / self.slots, "steps": self.steps_run,
            "tokens_generated": self.tokens_generated}

  # -- start-up and the engine thread ----------------------------------------------------------

  def warmup(self) -> None:
    """Compiles every program the engine runs (each prefill bucket, insert, decode)."""
    settings = self._sampling_scalars(SamplingParams(max_tokens=1))
    for bucket in self.buckets:
      cache, token = _prefill(self.model, self.variables, np.zeros((1, bucket), np.int32),
                              jnp.int32(1), settings, max_len=self.max_len)
    self._caches = _insert(self._caches, cache, jnp.int32(0))
    for width in self.widths:
      self._decode(width)
    jax.block_until_ready((self._caches, token))

  def compiled_programs(self) -> int:
    """How many programs the engine's jitted functions hold (a test checks it stays put)."""
    return sum(f._cache_size() for f in (_prefill, _insert, _decode, _take_slots, _put_slots))

  def start(self) -> None:
    self._running = True
    self._thread = threading.Thread(target=self._loop, name="jaxft-generation", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Ends the engine thread; requests still queued or running end as "cancelled"."""
    self._running = False
    self._wake.set()
    if self._thread is not None:
      self._thread.join()
    for request in [*self._pending, *(r for r in self._active if r is not None)]:
      self._finish(request, "cancelled")
    self._pending.clear()
    self._active = [None] * self.slots

  def _loop(self) -> None:
    while self._running:
      try:
        self._admit()
        if not any(r is not None for r in self._active):
          self._wake.wait(0.05)
          self._wake.clear()
          continue
        self._step()
      except Exception:  # a failed step fails its requests, never the server
        log.exception("generation step failed; its requests end")
        for i, request in enumerate(self._active):
          if request is not None:
            self._finish(request, "error")
            self._active[i] = None

  @staticmethod
  def _sampling_scalars(p: SamplingParams):
    return (jnp.uint32(p.seed % 2**32), jnp.float32(p.temperature), jnp.int32(p.top_k),
            jnp.float32(p.top_p))

  def _admit(self) -> None:
    """Prefills waiting requests into free slots."""
    while None in self._active:
      with self._lock:
        if not self._pending:
          return
        request = self._pending.popleft()
      if request.cancelled:
        self._finish(request, "cancelled")
        continue
      n = len(request.prompt)
      bucket = next(b for b in self.buckets if b >= n)
      tokens = np.zeros((1, bucket), np.int32)
      tokens[0, :n] = request.prompt
      p = request.params
      slot = self._active.index(None)
      try:
        cache, token = _prefill(self.model, self.variables, tokens, jnp.int32(n),
                                self._sampling_scalars(p), max_len=self.max_len)
        self._caches = _insert(self._caches, cache, jnp.int32(slot))
      except Exception:  # this request fails alone; the running ones go on
        log.exception("prefill failed; the request ends")
        self._finish(request, "error")
        continue
      self._active[slot] = request
      h = self._host
      h["seeds"][slot], h["temperature"][slot] = p.seed % 2**32, p.temperature
      h["top_k"][slot], h["top_p"][slot] = p.top_k, p.top_p
      self._take(slot, int(token))

  def _decode(self, width: int) -> np.ndarray:
    """A token for each of the first `width` slots."""
    h = {name: values[:width] for name, values in self._host.items()}
    caches = self._caches if width == self.slots else _take_slots(self._caches, width=width)
    caches, tokens = _decode(self.model, self.variables, caches, h["last"], h["positions"],
                             h["seeds"], h["steps"], h["temperature"], h["top_k"], h["top_p"])
    self._caches = caches if width == self.slots else _put_slots(self._caches, caches)
    return np.asarray(tokens)

  def _step(self) -> None:
    for i, request in enumerate(self._active):  # the cancelled leave before the step
      if request is not None and request.cancelled:
        self._finish(request, "cancelled")
        self._active[i] = None
    if not any(r is not None for r in self._active):
      return
    highest = max(i for i, r in enumerate(self._active) if r is not None)
    tokens = self._decode(next(w for w in self.widths if w > highest))
    self.steps_run += 1
    for slot, request in enumerate(self._active):
      if request is not None:
        self._take(slot, int(tokens[slot]))

  def _take(self, slot: int, token: int) -> None:
    """A slot's new token: emitted, or the request's end (the EOS id itself is not emitted)."""
    request = self._active[slot]
    if token in self.eos_ids:
      self._finish(request, "stop")
      self._active[slot] = None
      return
    request.tokens.append(token)
    self.tokens_generated += 1
    _emit(request, "token", token)
    if request.cancelled or len(request.tokens) >= request.params.max_tokens:
      self._finish(request, "cancelled" if request.cancelled else "length")
      self._active[slot] = None
      return
    h = self._host  # the next step feeds this token at the position after it
    h["last"][slot] = token
    h["positions"][slot] = len(request.prompt) + len(request.tokens) - 1
    h["steps"][slot] = len(request.tokens)

  @staticmethod
  def _finish(request: Request, reason: str) -> None:
    if request.finish_reason is None:
      request.finish_reason = reason
      _emit(request, "done", reason)


def _emit(request: Request, kind: str, value) -> None:
  """A callback that fails (its listener is gone) cancels its request, never the engine."""
  try:
    request.emit(kind, value)
  except Exception:  # noqa: BLE001
    log.exception("a request's listener failed; the request is cancelled")
    request.cancelled = True

