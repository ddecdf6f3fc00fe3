"""Reading and writing Hugging Face model directories through the tables of jaxft/hf/tables.py:
safetensors (or pytorch_model.bin) -> jaxft params with a shape check on every tensor, jaxft
params -> an HF state dict, and a whole directory (config.json, weights, tokenizer) for export.
Layers stacked by config.model.scan_layers are stacked / unstacked here.
"""

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxft import trees
from jaxft.hf.config import CONFIG_FILE, bert_config_dict, gpt2_config_dict, labels_dict
from jaxft.hf.decoder_config import check_exportable, decoder_config_dict
from jaxft.hf.tables import (
  ARCHITECTURES,
  BACKBONES,
  IGNORED_SUFFIXES,
  Arch,
  Row,
)

log = logging.getLogger("jaxft")

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

# ---------------------------------------------------------------------------------------------
# weights


def _n_layer(leaf_paths, arch: Arch) -> int:
  marker = BACKBONES[arch.family].layers + "_"
  prefix = f"{arch.jaxft_prefix}/" if arch.jaxft_prefix else ""
  return len({p.removeprefix(prefix).split("/")[0] for p in leaf_paths
              if p.startswith(prefix + marker)})


# config.model.scan_layers keeps the layers as one nn.scan module ("h" / "layer") whose leaves
# have a leading layer axis; the tables are written per layer ("h_3"). These convert.


def _stack_prefix(arch: Arch) -> str:
  jp = f"{arch.jaxft_prefix}/" if arch.jaxft_prefix else ""
  return f"{jp}{BACKBONES[arch.family].layers}/"


def _is_stacked(leaf_paths, arch: Arch) -> bool:
  return any(p.startswith(_stack_prefix(arch)) for p in leaf_paths)


def _unstack(leaves: dict, arch: Arch, take=lambda x, i: x[i]) -> dict:
  """Stacked leaves "h/attn/..." [L, ...] -> per-layer leaves "h_{i}/attn/..."; others kept.
  `take(leaf, i)` picks layer i (of an array, or of a shape for the abstract tree)."""
  prefix, out = _stack_prefix(arch), {}
  for path, x in leaves.items():
    if not path.startswith(prefix):
      out[path] = x
      continue
    for i in range(x.shape[0]):
      out[f"{prefix[:-1]}_{i}/{path[len(prefix):]}"] = take(x, i)
  return out


def _stack(leaves: dict, arch: Arch, n_layer: int) -> dict:
  """The inverse of `_unstack` for arrays."""
  prefix = _stack_prefix(arch)
  per_layer = [f"{prefix[:-1]}_{i}/" for i in range(n_layer)]
  out = {p: x for p, x in leaves.items() if not p.startswith(tuple(per_layer))}
  for path in [p for p in leaves if p.startswith(per_layer[0])]:
    rest = path[len(per_layer[0]):]
    out[prefix + rest] = np.stack([leaves[layer + rest] for layer in per_layer])
  return out


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  return load_file(file)


def _read_torch(file: str) -> dict[str, np.ndarray]:
  import torch  # only needed for pytorch_model.bin checkpoints

  state = torch.load(file, weights_only=True, map_location="cpu")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


_LAYER_INDEX = re.compile(r"(^|\.)(layer|layers|h)\.(\d+)\.")


def select_layers(tensors: dict[str, np.ndarray], layers: list[int]) -> dict[str, np.ndarray]:
  """An HF state dict keeping only the transformer layers `layers` (in that order: the i-th
  kept layer becomes layer i), e.g. a 2-layer student started from layers 0 and 5 of a 6-layer
  model (BERT's encoder.layer.N, GPT-2's h.N, the decoders' layers.N)."""
  present = {int(m.group(3)) for k in tensors if (m := _LAYER_INDEX.search(k))}
  missing = sorted(set(layers) - present)
  if missing:
    raise ValueError(f"config.init_layers names layers {missing} that the checkpoint lacks "
                     f"(it has layers 0..{max(present, default=-1)})")
  new_index = {old: new for new, old in enumerate(layers)}
  out = {}
  for key, value in tensors.items():
    m = _LAYER_INDEX.search(key)
    if m is None:
      out[key] = value
    elif int(m.group(3)) in new_index:
      out[key[:m.start(3)] + str(new_index[int(m.group(3))]) + key[m.end(3):]] = value
  return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
  return _read_tensors(path)


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of an HF directory: single-file or sharded (*.index.json), safetensors first."""
  readers = ((SAFETENSORS_FILE, _read_safetensors), (TORCH_FILE, _read_torch))
  for name, read in readers:
    if os.path.exists(os.path.join(path, name)):
      return read(os.path.join(path, name))
    index = os.path.join(path, name + ".index.json")
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(read(os.path.join(path, shard)))
      return tensors
  raise FileNotFoundError(f"config.init_from / --init_from={path!r} has no {SAFETENSORS_FILE} or "
                          f"{TORCH_FILE} (nor a sharded *.index.json of either)")


def _fill(table: list[Row], tensors: dict[str, np.ndarray], want: dict, path: str,
          family: str, optional: set[str]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Every table row's HF tensor, shape-checked, converted into jaxft leaves of `want`.

  Returns (leaves, the optional jaxft paths the checkpoint lacks)."""
  missing = [r for r in table if r.hf not in tensors]
  required = [r.hf for r in missing if not set(r.jaxft) <= optional]
  if required:
    raise ValueError(f"{path} lacks {len(required)} {family} tensor(s): "
                     f"{', '.join(required[:8])}{' ...' if len(required) > 8 else ''} (it has "
                     f"{len(tensors)} tensors; is it a {family} checkpoint with the layer count "
                     "of its config.json?)")
  leaves: dict[str, np.ndarray] = {}
  for row in table:
    if row.hf not in tensors:
      continue
    shapes = [tuple(want[p].shape) for p in row.jaxft]
    tensor = tensors[row.hf]
    if tuple(tensor.shape) != row.hf_shape(shapes):
      raise ValueError(f"HF tensor {row.hf!r} in {path} has shape {tuple(tensor.shape)} but the "
                       f"jaxft model expects {row.hf_shape(shapes)} (for {', '.join(row.jaxft)}); "
                       "the weights do not match the config the model was built from (for a "
                       "classifier head: the number of labels)")
    for p, x in zip(row.jaxft, row.to_jaxft(tensor, shapes)):
      leaves[p] = x.astype(want[p].dtype)
  newly = sorted(p for r in missing for p in r.jaxft)
  unfilled = set(want) - set(leaves) - set(newly)
  if unfilled:  # a jaxft parameter the table does not cover: a bug here, not the user's
    raise RuntimeError(f"no HF tensor maps to jaxft params {sorted(unfilled)}")
  return leaves, newly


def _warn_unused(tensors, used, path, family, ignored=()):
  extra = [k for k in tensors if k not in used and not k.endswith(ignored)]
  if extra:
    log.warning("ignoring %d tensor(s) of %s that %s does not use: %s", len(extra), path,
                family, ", ".join(extra[:8]))


def _check_tied(tensors, arch: Arch, path: str, table: list[Row]) -> None:
  own = {r.hf for r in table}  # an untied model holds the "copy" as a tensor of its own
  for copy, source in arch.tied:
    if copy in own:
      continue
    if copy in tensors and source in tensors and not np.array_equal(tensors[copy],
                                                                    tensors[source]):
      raise ValueError(f"{path} has a {copy} that differs from {source}; jaxft ties them (as "
                       "transformers does by default) and cannot load an untied checkpoint")


def _backbone_names(tensors: dict, arch: Arch) -> dict:
  """Strips the backbone prefix whichever class saved the file ("bert.x" and "x" both -> "x"),
  keeping head tensors (classifier.*, cls.*, score.*, lm_head.*) as they are."""
  prefix = BACKBONES[arch.family].hf_prefix
  return {k.removeprefix(prefix): v for k, v in tensors.items()}


def load_params(path: str, expected: Mapping, architecture: str,
                init_fn=None, tensors: dict[str, np.ndarray] | None = None) -> dict:
  """HF weights in directory `path` -> a numpy param tree shaped like `expected` (the abstract
  tree of the jaxft module for `architecture`, e.g. `jax.eval_shape` of its unboxed init).

  The checkpoint may be any class of the same family: a head or pooler it lacks comes from
  `init_fn()` (the module's own random init), with a warning naming them, as transformers'
  "newly initialized" message. `tensors` (an HF state dict already in memory, e.g. a jaxft
  workdir's params through `to_hf_tensors`) replaces reading `path`.
  """
  arch = ARCHITECTURES[architecture]
  family = BACKBONES[arch.family].display
  raw = _read_tensors(path) if tensors is None else tensors
  want = trees.flat_paths(expected)
  stacked = _is_stacked(want, arch)
  if stacked:
    want = _unstack(want, arch, lambda s, i: jax.ShapeDtypeStruct(s.shape[1:], s.dtype))
  n_layer = _n_layer(want, arch)
  _check_tied(raw, arch, path, arch.rows(n_layer, with_hf_prefix=True, paths=want))
  tensors = _backbone_names(raw, arch)
  table = arch.rows(n_layer, with_hf_prefix=False, paths=want)
  leaves, newly = _fill(table, tensors, want, path, family, arch.optional(n_layer))
  if newly:
    if init_fn is None:
      raise ValueError(f"{path} has no weights for {', '.join(newly)}; it is not a "
                       f"{architecture} checkpoint")
    log.warning("%s has no weights for %s: newly initialised (train them before use)", path,
                ", ".join(newly))
    initial = trees.flat_paths(jax.device_get(init_fn()))
    leaves.update({p: np.asarray(initial[p], want[p].dtype) for p in newly})
  prefix = BACKBONES[arch.family].hf_prefix
  used = {r.hf for r in table} | {copy.removeprefix(prefix) for copy, _ in arch.tied}
  _warn_unused(tensors, used, path, architecture, IGNORED_SUFFIXES)
  return trees.unflat_paths(_stack(leaves, arch, n_layer) if stacked else leaves)


def load_hf_params(path: str, expected: Mapping) -> dict:
  """HF GPT-2 weights (GPT2Model / GPT2LMHeadModel) -> jaxft GPT2LMHeadModel params."""
  return load_params(path, expected, "GPT2LMHeadModel")


def load_bert_params(path: str, expected: Mapping) -> dict:
  """HF BertModel weights (bare, or the backbone of any BertFor*) -> jaxft BertModel params."""
  return load_params(path, expected, "BertModel")


def to_hf_tensors(params: Mapping, architecture: str = "GPT2LMHeadModel") -> dict[str, np.ndarray]:
  """jaxft params -> the state dict of `architecture` (float32, contiguous). Tied copies (the LM
  head, the MLM decoder) are left out, as transformers' save_pretrained leaves them out."""
  arch = ARCHITECTURES[architecture]
  leaves = {p: np.asarray(jax.device_get(x), np.float32)
            for p, x in trees.flat_paths(params).items()}
  if _is_stacked(leaves, arch):
    leaves = _unstack(leaves, arch)
  n_layer = _n_layer(leaves, arch)
  rows = arch.rows(n_layer, with_hf_prefix=True, paths=leaves)
  unmapped = set(leaves) - {p for r in rows for p in r.jaxft}
  if unmapped:  # would silently vanish from the export: a bug in the tables, not the user's
    raise RuntimeError(f"no {architecture} tensor holds jaxft params {sorted(unmapped)[:8]}")
  return {r.hf: r.to_hf([leaves[p] for p in r.jaxft]) for r in rows}


def config_dict(cfg, tokenizer=None, architecture: str = "GPT2LMHeadModel",
                labels: list[str] | None = None) -> dict:
  """The config.json of `architecture` for this model, with the special ids jaxft pads with
  (GPT-2: EOS, which GPT2ForSequenceClassification must skip; BERT: [PAD])."""
  family = ARCHITECTURES[architecture].family
  if family == "gpt2":
    return gpt2_config_dict(cfg, getattr(tokenizer, "eos_id", None), architecture, labels)
  if family == "llama":
    check_exportable(cfg)
    return decoder_config_dict(cfg, architecture, labels_dict(labels), _special_ids(tokenizer))
  pad = tokenizer.special_id("pad_token") if tokenizer and "pad_token" in tokenizer.special else 0
  return bert_config_dict(cfg, architecture, labels, pad)


def _special_ids(tokenizer) -> dict:
  """bos / eos (every id generation stops at) / pad ids of the tokenizer, for config.json."""
  if tokenizer is None:
    return {}
  out = {}
  for role in ("bos", "pad"):
    token = tokenizer.special.get(f"{role}_token") if tokenizer.special else None
    if token is not None:
      out[f"{role}_token_id"] = tokenizer.special_id(f"{role}_token")
  eos = list(getattr(tokenizer, "eos_ids", ()) or ([tokenizer.eos_id] if tokenizer.eos_id
                                                     is not None else []))
  if eos:
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  if "pad_token_id" not in out and eos:  # *ForSequenceClassification skips pad_token_id
    out["pad_token_id"] = eos[0]
  return out


# The query/key/value kernels and biases and the output kernel of a trimmed GPT-2 / BERT, with
# the head axis counted from the end (a scanned stack's leading layer axis shifts nothing).
_HEAD_AXIS = {("query", "kernel"): -2, ("key", "kernel"): -2, ("value", "kernel"): -2,
              ("query", "bias"): -2, ("key", "bias"): -2, ("value", "bias"): -2,
              ("out", "kernel"): -3}


def pad_pruned_heads(params: Mapping, cfg, architecture: str):
  """(params, cfg) of a GPT-2 / BERT whose heads were pruned (head_dim set, fewer heads) with
  zero heads appended up to hidden / head_dim: transformers derives the head size from
  hidden / heads, so it cannot hold fewer heads. A zero query/key/value head with zero bias
  outputs exactly 0 (its softmax weights average zero values), so the padded model computes
  the same function. Other models are returned as they are."""
  family = ARCHITECTURES[architecture].family
  if family not in ("gpt2", "bert") or not getattr(cfg, "head_dim", 0):
    return params, cfg
  width, heads_field = (("n_embd", "n_head") if family == "gpt2"
                        else ("hidden_size", "num_attention_heads"))
  width, heads = getattr(cfg, width), getattr(cfg, heads_field)
  if width % cfg.head_dim:
    raise ValueError(f"config.model.head_dim={cfg.head_dim} does not divide the width {width}: "
                     f"transformers' {family} cannot hold this model's heads")
  full = width // cfg.head_dim
  if heads == full:
    return params, dataclasses.replace(cfg, head_dim=0)
  leaves = {}
  for path, x in trees.flat_paths(params).items():
    axis = _HEAD_AXIS.get(tuple(path.split("/")[-2:])) if "/attn/" in path else None
    if axis is not None:
      x = np.asarray(jax.device_get(x))
      pad = [(0, 0)] * x.ndim
      pad[x.ndim + axis] = (0, full - heads)
      x = np.pad(x, pad)
    leaves[path] = x
  log.warning("%s: the model's %d heads per layer (the rest pruned) are exported as %d, the "
              "pruned ones as zeros (transformers' %s derives the head size from the width); "
              "it computes the same function at the original attention cost", architecture,
              heads, full, family)
  return trees.unflat_paths(leaves), dataclasses.replace(cfg, head_dim=0,
                                                        **{heads_field: full})


def save_hf(out_dir: str, params: Mapping, cfg, tokenizer=None,
            architecture: str = "GPT2LMHeadModel", labels: list[str] | None = None) -> None:
  """Writes config.json + model.safetensors (+ the tokenizer's files) for from_pretrained.
  A GPT-2 / BERT with pruned heads is written with zero heads in their place
  (`pad_pruned_heads`)."""
  os.makedirs(out_dir, exist_ok=True)
  params, cfg = pad_pruned_heads(params, cfg, architecture)
  config = config_dict(cfg, tokenizer, architecture, labels)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(to_hf_tensors(params, architecture), os.path.join(out_dir, SAFETENSORS_FILE),
            metadata={"format": "pt"})  # as transformers writes; older releases require it
  if tokenizer is not None:
    tokenizer.save(out_dir)
