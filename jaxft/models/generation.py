"""Sampling with a KV cache: one jitted program prefills a left-padded batch, then decodes
(the library behind `python -m jaxft.generate`, the end-of-training samples and the server).

Prompts of different lengths are left-padded to the longest (padding has segment id 0, so no
query attends to it) and every row's positions start at 0 at its first real token, so a row
generates exactly what it would alone. Decoding is a `lax.while_loop` of one-token steps that
ends once every row has emitted EOS. Sampling follows transformers' order: temperature, then
top-k, then top-p; temperature 0 is greedy. A prompt that leaves no room for max_new_tokens in
the learned position table is an error rather than a silent left-truncation: dropping the start
of a prompt changes what the model is conditioned on, so the user should choose.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # keep the k most likely tokens; 0 = all
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p

  def validate(self) -> None:
    if self.temperature < 0:
      raise ValueError(f"--temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"--top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"--top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter)")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Scaled logits [B, V] with the tokens top-k / top-p exclude set to -inf."""
  logits = logits / sampling.temperature
  if 0 < sampling.top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if sampling.top_p < 1:
    logits = nucleus_filter(logits, sampling.top_p)
  return logits


def nucleus_filter(logits: jax.Array, top_p) -> jax.Array:
  """logits [B, V] with the tokens outside the top-p nucleus set to -inf; `top_p` a number or
  per-row values [B, 1] (the server's requests each bring their own)."""
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # A token stays if the tokens ranked above it hold less than top_p: the most likely one
  # always stays, and the kept set is the smallest whose mass reaches top_p.
  kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B] from last-position logits [B, V]."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next token ids [B] from logits [B, V], each row with its own sampling settings [B] (the
  server's requests): row b draws exactly what `sample_tokens` draws for that row alone with
  key fold_in(key(seeds[b]), steps[b]) and Sampling(temperature[b], top_k[b], top_p[b])."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

  def filtered(x):
    v = x.shape[-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)  # v: keep every token
    kth = jnp.take_along_axis(jnp.flip(jnp.sort(x, axis=-1), axis=-1), (k - 1)[:, None], -1)
    x = jnp.where(x < kth, -jnp.inf, x)
    # top_p == 1 must keep every token (a rounded cumulative sum can reach 1 early).
    return jnp.where((top_p < 1)[:, None], nucleus_filter(x, top_p[:, None]), x)

  def draw(x):
    # The sorts cost more than a small model's step: skipped when no row filters.
    x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), filtered, lambda x: x, x)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
    return jax.vmap(lambda k, x: jax.random.categorical(k, x[None], axis=-1)[0])(keys, x)

  # So is the Gumbel noise of a [B, V] draw: skipped when every row is greedy.
  drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda x: greedy, scaled)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def empty_cache(model: nn.Module, batch: int, length: int):
  """Zeroed KV caches with room for `length` tokens per row (shapes from an abstract init)."""
  dummy = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_ids"))
def _generate(model, variables, tokens, lengths, key, *, max_new_tokens: int, sampling: Sampling,
              eos_ids: tuple[int, ...]):
  """tokens [B, P] left-padded, lengths [B] -> new tokens [B, max_new_tokens].

  Columns after a row's EOS hold the first EOS id (also where the loop stopped early because
  every row had finished); the caller cuts each row at its first EOS (any of `eos_ids`).
  """
  b, p = tokens.shape
  n_pad = (p - lengths)[:, None]
  column = jnp.arange(p)[None]
  segment_ids = (column >= n_pad).astype(jnp.int32)  # 0 = left padding
  positions = jnp.maximum(column - n_pad, 0)
  # The last sampled token is never fed back, hence max_new_tokens - 1 decode slots.
  cache = empty_cache(model, b, p + max_new_tokens - 1)
  fill = eos_ids[0] if eos_ids else 0
  stops = jnp.asarray(eos_ids or (-1,), jnp.int32)
  is_eos = lambda t: jnp.any(t[:, None] == stops[None, :], axis=-1)  # noqa: E731

  def step(cache, step_tokens, step_positions, step_segments, i):
    logits, mutated = model.apply(
        {**variables, "cache": cache}, step_tokens, step_positions, step_segments,
        deterministic=True, decode=True, mutable=["cache"])
    return mutated["cache"], sample_tokens(logits[:, -1], jax.random.fold_in(key, i), sampling)

  cache, first = step(cache, tokens, positions, segment_ids, 0)
  out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
  done = is_eos(first)
  ones = jnp.ones((b, 1), jnp.int32)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last, out, done, cache = carry
    cache, nxt = step(cache, last[:, None], (lengths + i - 1)[:, None], ones, i)
    nxt = jnp.where(done, fill, nxt)  # finished rows emit nothing new
    done = done | is_eos(nxt)
    return i + 1, nxt, out.at[:, i].set(nxt), done, cache

  _, _, out, _, _ = jax.lax.while_loop(cond, body, (1, first, out, done, cache))
  return out


def check_token_ids(rows, vocab_size: int, what: str = "prompt") -> None:
  """Every id in [0, vocab_size): ids of another tokenizer would otherwise index past the
  embedding table without an error (XLA clamps out-of-range gathers)."""
  for i, row in enumerate(rows):
    if len(row) and (min(row) < 0 or max(row) >= vocab_size):
      raise ValueError(f"{what} {i} has token ids outside [0, {vocab_size}) (the model's "
                       "vocab_size): was it encoded with another tokenizer?")


def generate(model, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | Sequence[int] | None = None) -> list[list[int]]:
  """Each prompt's continuation: up to max_new_tokens ids, cut before the first EOS (any of
  them, where `eos_id` is several: Llama 3 and Gemma stop at end-of-turn as well).

  `model` is a causal LM (GPT2LMHeadModel, LlamaForCausalLM; or one bound to its PEFT
  method, jaxft.peft.bind), `params`
  its (unboxed) params, or its variables {"params": ..., "peft": ...}. The same seed and
  prompts give the same samples.
  """
  variables = params if "params" in params else {"params": params}
  cfg = model.cfg
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  sampling.validate()
  if not prompts:
    raise ValueError("no prompts to continue")
  if max_new_tokens < 0:
    raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 0")
  check_token_ids(prompts, cfg.vocab_size)
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f"prompt {i} has no tokens; start it with at least one token (e.g. the "
                       "EOS token, as GPT-2 does for unconditional samples)")
    context = cfg.context_length
    if len(prompt) + max_new_tokens > context:
      raise ValueError(
          f"prompt {i} has {len(prompt)} tokens, and with --max_new_tokens={max_new_tokens} the "
          f"sequence would outgrow the model's {cfg.context_field}={context} (prompt + new tokens "
          f"<= {context}): lower --max_new_tokens to at most "
          f"{max(context - len(prompt), 0)} or shorten the prompt")
  if max_new_tokens == 0:
    return [[] for _ in prompts]

  longest = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), longest), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, longest - len(prompt):] = prompt
  lengths = np.array([len(p) for p in prompts], np.int32)
  eos_ids = (() if eos_id is None else (int(eos_id),) if isinstance(eos_id, (int, np.integer))
             else tuple(int(e) for e in eos_id))
  out = _generate(model, variables, tokens, lengths, jax.random.key(seed),
                  max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids)
  out = np.asarray(jax.device_get(out)).tolist()
  return [_cut(row, eos_ids) for row in out]


def _cut(row: list[int], eos_ids: tuple[int, ...]) -> list[int]:
  """`row` up to (without) its first EOS id."""
  for i, t in enumerate(row):
    if t in eos_ids:
      return row[:i]
  return row
