"""Generic helpers over nested dicts of arrays (model variables, optimizer state): flatten,
split by a boolean mask and join again, count parameters and bytes. The bottom layer: every
other part of jaxft may import it; it imports nothing of jaxft."""

from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util


def flat(tree: Mapping) -> dict[tuple[str, ...], object]:
  """{path tuple: leaf} of a nested dict ({} for an empty or None tree)."""
  return traverse_util.flatten_dict(dict(tree)) if tree else {}


def unflat(leaves: Mapping[tuple[str, ...], object]) -> dict:
  return traverse_util.unflatten_dict(dict(leaves))


def split(tree: Mapping, mask: Mapping) -> tuple[dict, dict]:
  """(leaves where mask is True, the others), each a nested dict of the same paths as `tree`."""
  leaves, keep = flat(tree), flat(mask)
  trainable = {k: v for k, v in leaves.items() if keep[k]}
  frozen = {k: v for k, v in leaves.items() if not keep[k]}
  return unflat(trainable), unflat(frozen)


def combine(frozen: Mapping, trainable: Mapping) -> dict:
  """The union of two disjoint trees (a model's variables from their split parts)."""
  return unflat({**flat(frozen), **flat(trainable)})


def by_module(tree: Mapping) -> dict[tuple, dict]:
  """{module path: {leaf name: leaf}}: leaves grouped by the layer that holds them."""
  out: dict[tuple, dict] = {}
  for key, value in flat(tree).items():
    out.setdefault(key[:-1], {})[key[-1]] = value
  return out


def path_str(path: tuple[str, ...]) -> str:
  return "/".join(str(p) for p in path)


def count(tree: Mapping) -> int:
  """Number of scalars in the tree's array leaves."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def nbytes(tree) -> int:
  """Bytes of the tree's array leaves (abstract ShapeDtypeStructs count too)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "shape")))


def flat_paths(tree: Mapping) -> dict[str, object]:
  """{"a/b/c": leaf}: flat() with string paths (HF tables and adapter files name leaves so)."""
  return {path_str(k): v for k, v in flat(tree).items()}


def unflat_paths(leaves: Mapping[str, object]) -> dict:
  return unflat({tuple(k.split("/")): v for k, v in leaves.items()})
