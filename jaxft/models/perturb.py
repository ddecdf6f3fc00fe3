"""Perturbations of the token embeddings, for adversarial training and attacks (jaxft/run/
adversarial.py), without touching any model.

Every family looks its tokens up with one `nn.Embed` (BERT's `word`, GPT-2's `wte`, the
decoders' `embed`). A flax method interceptor adds a perturbation to what that module's
`__call__` returns: the word embedding before position / token-type embeddings are added (and
before BERT's embedding LayerNorm), the place Miyato et al. (2017) and FreeLB perturb. GPT-2's
tied head reads `wte` through `attend`, which is not intercepted. A task may embed several
inputs in one loss (DPO's chosen and rejected): the i-th call gets the i-th perturbation.
"""

import contextlib

import jax
from flax import linen as nn

# Names of the token-embedding module in each family (bert.py, gpt2.py, llama.py).
TOKEN_EMBEDDING_NAMES = ("word", "wte", "embed")


def _is_token_embedding(context) -> bool:
  module = context.module
  return (context.method_name == "__call__" and isinstance(module, nn.Embed)
          and module.name in TOKEN_EMBEDDING_NAMES)


@contextlib.contextmanager
def token_embeddings_plus(deltas):
  """Model calls inside add deltas[i] ([B, T, D], the embedding's shape) to the i-th token
  embedding lookup. Raises if the model embeds tokens more often than there are deltas."""
  calls = [0]

  def intercept(f, args, kwargs, context):
    out = f(*args, **kwargs)
    if not _is_token_embedding(context):
      return out
    i = calls[0]
    calls[0] += 1
    if i >= len(deltas):
      raise ValueError(f"the model embedded tokens {i + 1} times but only {len(deltas)} "
                       "perturbations were given")
    return out + deltas[i].astype(out.dtype)

  with nn.intercept_methods(intercept):
    yield


def token_embedding_shapes(fn, *args) -> list[jax.ShapeDtypeStruct]:
  """Shapes of each token-embedding output while `fn(*args)` runs (traced abstractly: nothing
  is computed). A function that embeds nothing is an error: there is nothing to perturb."""
  shapes = []

  def intercept(f, f_args, kwargs, context):
    out = f(*f_args, **kwargs)
    if _is_token_embedding(context):
      shapes.append(jax.ShapeDtypeStruct(out.shape, jax.numpy.float32))
    return out

  def traced(*a):
    with nn.intercept_methods(intercept):
      return fn(*a)

  jax.eval_shape(traced, *args)
  if not shapes:
    raise ValueError("the model has no token embedding (nn.Embed named one of "
                     f"{TOKEN_EMBEDDING_NAMES}) to perturb")
  return shapes
