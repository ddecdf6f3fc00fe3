"""Which units to keep (from importance scores and target fractions), and the smaller model:
its param tree and its config.model fields.

Every layer keeps the same number of heads and neurons (which ones: that layer's highest
scores), so the trimmed model is an ordinary model of its family (one head count, one MLP
width) and still runs under nn.scan. Layers are dropped by their gate's score (the lowest
first), not from the top. Grouped-query attention (Llama family, fewer KV heads than query
heads): the same number of query heads is pruned in every KV group and the KV heads stay; with
one query head per KV head (multi-head attention, GPT-2, BERT) a pruned head takes its key and
value with it.
"""

import dataclasses
import math

import numpy as np

from jaxft import trees
from jaxft.trimming import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class Plan:
  keep_layers: tuple[int, ...]  # original layer indices, ascending
  keep_heads: tuple[tuple[int, ...], ...]  # per kept layer: its query heads kept, ascending
  keep_mlp: tuple[tuple[int, ...], ...]  # per kept layer: its MLP neurons kept, ascending
  prune_kv: bool  # key/value heads go with their query head (one query head per KV head)
  shape: dict  # the trimmed model's counts (layers, heads, kv_heads, mlp, head_dim)


def check_fraction(value: float, flag: str) -> float:
  if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0) or math.isnan(value):
    raise ValueError(f"{flag}={value!r} must be a fraction in [0, 1): the share of units to "
                     "remove (0 keeps them all; 1 would remove every one)")
  return float(value)


def layers_to_drop(spec, n_layers: int) -> int:
  """--layers: a count of layers to drop ("2") or a fraction of them ("0.25")."""
  text = str(spec).strip()
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f"--layers={spec!r} is neither a count of layers to drop (e.g. 2) nor a "
                     "fraction of them (e.g. 0.25)") from None
  if "." in text or "e" in text.lower():
    n = _round(check_fraction(value, "--layers") * n_layers)
  else:
    n = int(value)
  if n < 0 or n >= n_layers:
    raise ValueError(f"--layers={spec!r} would drop {n} of the model's {n_layers} layers; drop "
                     f"between 0 and {n_layers - 1}")
  return n


def _round(x: float) -> int:
  return int(math.floor(x + 0.5))  # half up, not to even: 0.5 of 3 heads prunes 2


def _top(scores: np.ndarray, keep: int) -> tuple[int, ...]:
  # A stable sort: ties keep the lower index (deterministic whatever the scores' noise).
  order = np.argsort(-scores, kind="stable")
  return tuple(sorted(int(i) for i in order[:keep]))


def make_plan(scores: dict, shape: dict, heads: float, mlp: float, drop_layers: int) -> Plan:
  """The units to keep: the `heads` / `mlp` fraction (rounded half up) of each layer's
  lowest-scoring heads / neurons removed, and the `drop_layers` lowest-scoring layers."""
  heads, mlp = check_fraction(heads, "--heads"), check_fraction(mlp, "--mlp")
  n_layers, n_heads, n_kv = shape["layers"], shape["heads"], shape["kv_heads"]
  keep_layers = _top(np.asarray(scores["layers"]), n_layers - drop_layers)
  group = n_heads // n_kv  # query heads per KV head
  per_group = _round(heads * group) if group > 1 else _round(heads * n_heads)
  if (group > 1 and per_group >= group) or (group == 1 and per_group >= n_heads):
    raise ValueError(f"--heads={heads} would remove every head (the model has {n_heads} query "
                     f"heads{f' in {n_kv} KV groups' if group > 1 else ''}); use a smaller "
                     "fraction")
  n_mlp = shape["mlp"] - _round(mlp * shape["mlp"])
  if n_mlp < 1:
    raise ValueError(f"--mlp={mlp} would remove every MLP neuron; use a smaller fraction")
  keep_heads, keep_mlp = [], []
  for layer in keep_layers:
    s = np.asarray(scores["heads"][layer])
    if group == 1:
      keep_heads.append(_top(s, n_heads - per_group))
    else:  # transformers' repeat_kv: KV head g serves query heads g*group .. g*group+group-1
      kept = [g * group + i for g in range(n_kv)
              for i in _top(s[g * group:(g + 1) * group], group - per_group)]
      keep_heads.append(tuple(kept))
    keep_mlp.append(_top(np.asarray(scores["mlp"][layer]), n_mlp))
  new_heads = len(keep_heads[0])
  return Plan(keep_layers, tuple(keep_heads), tuple(keep_mlp), prune_kv=group == 1,
              shape={"layers": len(keep_layers), "heads": new_heads,
                     "kv_heads": new_heads if group == 1 else n_kv, "mlp": n_mlp,
                     "head_dim": shape["head_dim"]})


def _take(x, keep, axis: int):
  return np.take(np.asarray(x), np.asarray(keep, np.int64), axis=axis)


def apply_plan(params, plan: Plan, family: masks_lib.Family) -> dict:
  """The trimmed param tree (per-layer layout, not scanned) from the original's."""
  out = {}
  new_index = {old: new for new, old in enumerate(plan.keep_layers)}
  for path, x in trees.flat_paths(params).items():
    parts = path.split("/")
    layer_at = next((k for k, p in enumerate(parts) if p.startswith(family.stack + "_")
                     and p[len(family.stack) + 1:].isdigit()), None)
    if layer_at is None:  # embeddings, final norm, pooler, head
      out[path] = np.asarray(x)
      continue
    old = int(parts[layer_at][len(family.stack) + 1:])
    if old not in new_index:
      continue  # a dropped layer
    j = new_index[old]
    parts[layer_at] = f"{family.stack}_{j}"
    module, leaf = tuple(parts[-3:-1]), parts[-1]
    heads, mlp = plan.keep_heads[j], plan.keep_mlp[j]
    if module[0] == "attn" and (module[1] == "query" or (module[1] in ("key", "value")
                                                          and plan.prune_kv)):
      x = _take(x, heads, 1 if leaf == "kernel" else 0)  # [embed, heads, dh] / [heads, dh]
    elif module == ("attn", "out") and leaf == "kernel":
      x = _take(x, heads, 0)  # [heads, dh, embed]
    elif module[0] == "mlp" and module[1] in family.mlp_in:
      x = _take(x, mlp, 1 if leaf == "kernel" else 0)  # [embed, mlp] / [mlp]
    elif module == ("mlp", family.mlp_out) and leaf == "kernel":
      x = _take(x, mlp, 0)  # [mlp, embed]
    out["/".join(parts)] = np.asarray(x)
  return trees.unflat_paths(out)


def model_overrides(model_config, plan: Plan, family: masks_lib.Family, old_shape: dict) -> dict:
  """The config.model fields of the trimmed model."""
  out = {family.layers_field: plan.shape["layers"], family.heads_field: plan.shape["heads"]}
  if plan.shape["heads"] != old_shape["heads"]:
    out["head_dim"] = plan.shape["head_dim"]  # no longer width / heads
  if family.mlp_field == "n_inner" and plan.shape["mlp"] == 4 * model_config.get("n_embd", 768):
    out["n_inner"] = 0
  else:
    out[family.mlp_field] = plan.shape["mlp"]
  if model_config.get("num_key_value_heads"):  # Llama family with an explicit KV head count
    out["num_key_value_heads"] = plan.shape["kv_heads"]
  if model_config.get("layer_types"):  # per-layer attention kinds follow their layers
    types = list(model_config.layer_types)
    out["layer_types"] = [types[i] for i in plan.keep_layers]
  return out
