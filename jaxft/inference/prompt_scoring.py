"""Scoring label continuations with a causal LM: the log-likelihood of every candidate after every
prompt, in right-padded rows bucketed to a few lengths (powers of two up to the context) and run
through the one evaluation loop (jaxft/run/evaluation.py) by one jitted function."""

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.run import evaluation

SCORINGS = ("sum", "mean")
_MIN_BUCKET = 16


def sequence_logprobs(model, params, tokens, positions, segment_ids, starts, targets,
                      target_mask):
  """Summed log p(targets) per row [B]; the one place the model runs.

  tokens, positions, segment_ids [B, T]: prompt + candidate, right-padded (segment 0). The
  candidate's C tokens (targets [B, C], target_mask [B, C] marks the real ones) sit at
  positions starts .. starts + C - 1, so they are predicted at starts - 1 .. : only those C
  positions reach the LM head ([B, C, V] logits, never [B, T, V]). `params` is the params tree
  or the whole variables dict ({"params": ..., plus e.g. a PEFT collection}), as in generate.
  """
  variables = params if "params" in params else {"params": params}
  width = targets.shape[1]

  def forward(module, tokens, positions, segment_ids):
    hidden = module.hidden(tokens, positions, segment_ids, deterministic=True)  # [B, T, D]
    at = jnp.clip(starts[:, None] - 1 + jnp.arange(width)[None], 0, tokens.shape[1] - 1)
    hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)  # [B, C, D]
    return module.logits(hidden)  # [B, C, V]

  logits = model.apply(variables, tokens, positions, segment_ids, method=forward)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, C]
  return jnp.sum(jnp.where(target_mask, picked, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _score_batch(params, batch, *, model):
  return sequence_logprobs(model, params, **batch)


@dataclasses.dataclass
class Scores:
  logprobs: np.ndarray  # [N, L] summed log-probability of candidate j after prompt i
  prompts: list[list[int]]  # the token ids each prompt was scored with (prefix, truncation)
  truncated: int  # prompts cut from the left to fit the context


def fit_prompt(prompt: Sequence[int], room: int, prefix: Sequence[int] = ()) -> list[int]:
  """prefix + the newest tokens of prompt, at most `room` tokens in all."""
  keep = room - len(prefix)
  return [*prefix, *(prompt[len(prompt) - keep:] if len(prompt) > keep else prompt)]


def _bucket(length: int, max_len: int) -> int:
  """Padded row length: the next power of two (at least _MIN_BUCKET), at most max_len."""
  size = _MIN_BUCKET
  while size < length:
    size *= 2
  return min(size, max_len)


def score_candidates(model, params, prompts: Sequence[Sequence[int]],
                     candidates: Sequence[Sequence[int]], *, max_len: int, batch_size: int,
                     prefix: Sequence[int] = ()) -> Scores:
  """Log-likelihood of every candidate continuation after every prompt.

  Each prompt is `prefix + prompt`, cut from the left (the prefix stays) so that it fits
  `max_len` tokens with the longest candidate; every candidate of a prompt sees the same tokens.
  """
  if not candidates or any(not c for c in candidates):
    raise ValueError("every candidate needs at least one token (is a verbaliser empty after "
                     "tokenization?)")
  width = max(len(c) for c in candidates)
  room = max_len - width
  if room < len(prefix) + 1:
    raise ValueError(f"the longest label continuation has {width} tokens, which leaves no room "
                     f"for a prompt in {max_len} tokens of context; shorten the --verbalizer "
                     "words or raise --max_len (up to the model's n_positions)")
  params = jax.device_put(params)  # once, not per batch (HF weights arrive as numpy)
  fitted = [fit_prompt(p, room, prefix) for p in prompts]
  truncated = sum(len(prefix) + len(p) > room for p in prompts)
  for i, p in enumerate(fitted):
    if not p:
      raise ValueError(f"prompt {i} has no tokens; keep --bos on (the EOS token starts it) or "
                       "use a --template with text before {label}")

  rows = [(i, j) for i in range(len(fitted)) for j in range(len(candidates))]
  by_length = collections.defaultdict(list)
  for i, j in rows:
    by_length[_bucket(len(fitted[i]) + len(candidates[j]), max_len)].append((i, j))
  chunks, batches = [], []
  for length, bucket in sorted(by_length.items()):
    for start in range(0, len(bucket), batch_size):
      chunk = bucket[start:start + batch_size]
      # A short last batch is padded to a power of two: few shapes, few compilations.
      b = min(batch_size, 1 << (len(chunk) - 1).bit_length())
      tokens = np.zeros((b, length), np.int32)
      positions = np.zeros((b, length), np.int32)
      segments = np.zeros((b, length), np.int32)
      starts = np.ones((b,), np.int32)
      targets = np.zeros((b, width), np.int32)
      mask = np.zeros((b, width), bool)
      for r, (i, j) in enumerate(chunk):
        row = fitted[i] + list(candidates[j])
        tokens[r, :len(row)] = row
        positions[r, :len(row)] = np.arange(len(row))
        segments[r, :len(row)] = 1
        starts[r] = len(fitted[i])
        targets[r, :len(candidates[j])] = candidates[j]
        mask[r, :len(candidates[j])] = True
      chunks.append(chunk)
      batches.append({"tokens": tokens, "positions": positions, "segment_ids": segments,
                      "starts": starts, "targets": targets, "target_mask": mask})
  outputs = evaluation.run_batches(functools.partial(_score_batch, model=model), batches, params)
  logprobs = np.zeros((len(fitted), len(candidates)), np.float64)
  for chunk, out in zip(chunks, outputs):
    for r, (i, j) in enumerate(chunk):
      logprobs[i, j] = out[r]
  return Scores(logprobs, fitted, truncated)


def candidate_scores(logprobs: np.ndarray, lengths: Sequence[int], method: str) -> np.ndarray:
  """sum: the summed log-probability; mean: divided by the candidate's token count."""
  if method == "sum":
    return logprobs
  if method == "mean":
    return logprobs / np.asarray(lengths, np.float64)[None]
  raise ValueError(f"--scoring={method!r} is not one of {', '.join(SCORINGS)}")
