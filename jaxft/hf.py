"""Hugging Face <-> jaxft parameters: one table row per HF tensor, read and written generically.

A row names an HF tensor (without the "transformer." prefix that GPT2LMHeadModel adds), the
jaxft leaves it becomes and how the axes map. HF GPT-2 uses Conv1D, whose weight is (in, out):
the same layout as a flax kernel, so no row needs a transpose; c_attn packs q, k and v along its
output axis and jaxft keeps them as separate [embed, heads, head_dim] kernels. A new family (e.g.
BERT, whose nn.Linear weights are (out, in)) adds its own table to `_TABLES` and a transform for
the transpose; the readers, writers and shape checks below stay as they are.
"""

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from jaxft.models.gpt2 import GPT2Config

log = logging.getLogger("jaxft")

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
GPT2_EOS_ID = 50256  # <|endoftext|> of GPT-2's BPE: HF's bos/eos/pad for gpt2 checkpoints


@dataclasses.dataclass(frozen=True)
class Row:
  """One HF tensor <-> one or more jaxft leaves.

  hf: the HF name, "{i}" standing for the layer index.
  jaxft: "/"-separated param paths; several means the HF tensor is their concatenation along
    its last axis (equal parts, in this order).
  merge: for each HF axis, the consecutive jaxft axes it flattens (None: same shape). E.g.
    ((0,), (1, 2)) turns an [embed, heads, head_dim] kernel into HF's [embed, heads * head_dim].
  """

  hf: str
  jaxft: tuple[str, ...]
  merge: tuple[tuple[int, ...], ...] | None = None
  transpose: bool = False  # HF nn.Linear (out, in) weights: transposed before merging axes

  def hf_shape(self, jaxft_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    parts = [self._hf_part_shape(s) for s in jaxft_shapes]
    shape = (*parts[0][:-1], sum(p[-1] for p in parts))
    return shape[::-1] if self.transpose else shape

  def to_jaxft(self, tensor: np.ndarray, jaxft_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    # The merged axes are consecutive and in order, so splitting then reshaping is exact.
    parts = np.split(tensor.T if self.transpose else tensor, len(self.jaxft), axis=-1)
    return [np.ascontiguousarray(p.reshape(s)) for p, s in zip(parts, jaxft_shapes)]

  def to_hf(self, leaves: list[np.ndarray]) -> np.ndarray:
    parts = [x.reshape(self._hf_part_shape(x.shape)) for x in leaves]
    out = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(out.T if self.transpose else out)

  def _hf_part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.merge is None:
      return tuple(shape)
    return tuple(math.prod(shape[a] for a in axes) for axes in self.merge)


def _gpt2_table(n_layer: int) -> list[Row]:
  t = "transformer"
  rows = [
      Row("wte.weight", (f"{t}/wte/embedding",)),
      Row("wpe.weight", (f"{t}/wpe/embedding",)),
  ]
  per_layer = [
      Row("h.{i}.ln_1.weight", ("h_{i}/ln_1/scale",)),
      Row("h.{i}.ln_1.bias", ("h_{i}/ln_1/bias",)),
      Row("h.{i}.attn.c_attn.weight",
          ("h_{i}/attn/query/kernel", "h_{i}/attn/key/kernel", "h_{i}/attn/value/kernel"),
          merge=((0,), (1, 2))),  # 3 x [embed, heads, head_dim] -> [embed, 3 * embed]
      Row("h.{i}.attn.c_attn.bias",
          ("h_{i}/attn/query/bias", "h_{i}/attn/key/bias", "h_{i}/attn/value/bias"),
          merge=((0, 1),)),  # 3 x [heads, head_dim] -> [3 * embed]
      Row("h.{i}.attn.c_proj.weight", ("h_{i}/attn/out/kernel",),
          merge=((0, 1), (2,))),  # [heads, head_dim, embed] -> [embed, embed]
      Row("h.{i}.attn.c_proj.bias", ("h_{i}/attn/out/bias",)),
      Row("h.{i}.ln_2.weight", ("h_{i}/ln_2/scale",)),
      Row("h.{i}.ln_2.bias", ("h_{i}/ln_2/bias",)),
      Row("h.{i}.mlp.c_fc.weight", ("h_{i}/mlp/fc/kernel",)),
      Row("h.{i}.mlp.c_fc.bias", ("h_{i}/mlp/fc/bias",)),
      Row("h.{i}.mlp.c_proj.weight", ("h_{i}/mlp/proj/kernel",)),
      Row("h.{i}.mlp.c_proj.bias", ("h_{i}/mlp/proj/bias",)),
  ]
  for i in range(n_layer):
    rows += [Row(r.hf.format(i=i), tuple(f"{t}/{p.format(i=i)}" for p in r.jaxft), r.merge)
             for r in per_layer]
  rows += [
      Row("ln_f.weight", (f"{t}/ln_f/scale",)),
      Row("ln_f.bias", (f"{t}/ln_f/bias",)),
  ]
  return rows


def bert_table(n_layer: int, prefix: str = "") -> list[Row]:
  """HF BertModel <-> jaxft BertModel. `prefix` is where the backbone sits in both trees
  ("bert" inside BertFor* heads); HF nn.Linear weights are (out, in), hence the transposes."""
  hf_p = f"{prefix}." if prefix else ""
  jx = f"{prefix}/" if prefix else ""
  ln = lambda hf, j: [Row(f"{hf}.weight", (f"{j}/scale",)),  # noqa: E731
                      Row(f"{hf}.bias", (f"{j}/bias",))]
  linear = lambda hf, j, merge=None: [  # noqa: E731
      Row(f"{hf}.weight", (f"{j}/kernel",), merge=merge, transpose=True),
      Row(f"{hf}.bias", (f"{j}/bias",), merge=None if merge is None else ((0, 1),))]
  rows = [Row("embeddings.word_embeddings.weight", ("word/embedding",)),
          Row("embeddings.position_embeddings.weight", ("position/embedding",)),
          Row("embeddings.token_type_embeddings.weight", ("token_type/embedding",)),
          *ln("embeddings.LayerNorm", "ln_embed")]
  for i in range(n_layer):
    h, j = f"encoder.layer.{i}", f"layer_{i}"
    for name in ("query", "key", "value"):  # [embed, heads, head_dim] <- [embed, embed]
      rows += linear(f"{h}.attention.self.{name}", f"{j}/attn/{name}", ((0,), (1, 2)))
    rows += [Row(f"{h}.attention.output.dense.weight", (f"{j}/attn/out/kernel",),
                 merge=((0, 1), (2,)), transpose=True),  # [heads, head_dim, embed]
             Row(f"{h}.attention.output.dense.bias", (f"{j}/attn/out/bias",)),
             *ln(f"{h}.attention.output.LayerNorm", f"{j}/attn/ln"),
             *linear(f"{h}.intermediate.dense", f"{j}/fc"),
             *linear(f"{h}.output.dense", f"{j}/proj"),
             *ln(f"{h}.output.LayerNorm", f"{j}/ln")]
  rows += linear("pooler.dense", "pooler")
  return [Row(hf_p + r.hf, tuple(jx + p for p in r.jaxft), r.merge, r.transpose) for r in rows]


# HF names that are not parameters jaxft keeps: the causal-mask buffers older GPT-2 saves carry,
# and the LM head, which is tied to wte (checked equal when present).
_GPT2_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_GPT2_PREFIX = "transformer."
_TIED_HEAD = "lm_head.weight"

_TABLES = {"gpt2": _gpt2_table}


# ---------------------------------------------------------------------------------------------
# config.json


def read_hf_config(path: str) -> dict:
  """The HF config.json of directory `path` (given as config.init_from or --init_from)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from / --init_from={path!r} is not a directory; point "
                            "it at a local Hugging Face model directory (config.json + "
                            "model.safetensors or pytorch_model.bin)")
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"config.init_from / --init_from={path!r} has no {CONFIG_FILE}; it "
                            "should be a directory written by save_pretrained")
  with open(file) as f:
    return json.load(f)


def model_overrides(hf_config: dict) -> dict:
  """HF GPT-2 config.json -> `config.model` fields. Rejects variants jaxft's GPT-2 lacks."""
  model_type = hf_config.get("model_type")
  if model_type != "gpt2":
    raise ValueError(f"unsupported architecture: config.json has model_type={model_type!r}; "
                     "jaxft can load model_type 'gpt2' (GPT2Model / GPT2LMHeadModel)")
  # gelu_pytorch_tanh is the same tanh approximation as gelu_new.
  activation = hf_config.get("activation_function", "gelu_new")
  if activation not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"unsupported architecture: config.json has activation_function="
                     f"{activation!r}; jaxft's GPT-2 uses 'gelu_new' (tanh-approximated GELU)")
  n_embd = hf_config.get("n_embd", 768)
  n_inner = hf_config.get("n_inner")
  # Fields whose non-default values change the math jaxft implements.
  unsupported = {
      "n_inner": n_inner not in (None, 4 * n_embd),
      "scale_attn_weights": not hf_config.get("scale_attn_weights", True),
      "scale_attn_by_inverse_layer_idx": hf_config.get("scale_attn_by_inverse_layer_idx", False),
      "add_cross_attention": hf_config.get("add_cross_attention", False),
      "tie_word_embeddings": not hf_config.get("tie_word_embeddings", True),
  }
  for field, bad in unsupported.items():
    if bad:
      raise ValueError(f"unsupported architecture: config.json has {field}="
                       f"{hf_config.get(field)!r}, which jaxft's GPT-2 does not implement")
  return {
      "n_layer": int(hf_config.get("n_layer", 12)),
      "n_embd": int(n_embd),
      "n_head": int(hf_config.get("n_head", 12)),
      "vocab_size": int(hf_config.get("vocab_size", 50257)),
      # Old configs carry n_ctx next to n_positions; the position table is n_positions long.
      "n_positions": int(hf_config.get("n_positions", hf_config.get("n_ctx", 1024))),
      "layer_norm_epsilon": float(hf_config.get("layer_norm_epsilon", 1e-5)),
      "embd_pdrop": float(hf_config.get("embd_pdrop", 0.1)),
      "attn_pdrop": float(hf_config.get("attn_pdrop", 0.1)),
      "resid_pdrop": float(hf_config.get("resid_pdrop", 0.1)),
  }


def hf_config_dict(cfg: GPT2Config, eos_id: int | None = None) -> dict:
  """A config.json that transformers' GPT2Config reads as exactly this model."""
  if eos_id is None and cfg.vocab_size > GPT2_EOS_ID:
    eos_id = GPT2_EOS_ID
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": cfg.vocab_size,
      "n_positions": cfg.n_positions,
      "n_ctx": cfg.n_positions,  # read by older transformers releases
      "n_embd": cfg.n_embd,
      "n_layer": cfg.n_layer,
      "n_head": cfg.n_head,
      "n_inner": None,  # 4 * n_embd
      "activation_function": "gelu_new",
      "resid_pdrop": cfg.resid_pdrop,
      "embd_pdrop": cfg.embd_pdrop,
      "attn_pdrop": cfg.attn_pdrop,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_range": cfg.initializer_range,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "tie_word_embeddings": True,
      "use_cache": True,
      "bos_token_id": eos_id,
      "eos_token_id": eos_id,
      "dtype": "float32",
  }


# ---------------------------------------------------------------------------------------------
# weights


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, object]]:
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      yield from _flatten(value, path + "/")
    else:
      yield path, value


def _unflatten(leaves: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in leaves.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _n_layer(leaf_paths) -> int:
  return len({p.split("/")[1] for p in leaf_paths if p.startswith("transformer/h_")})


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(file)


def _read_torch(file: str) -> dict[str, np.ndarray]:
  import torch  # only needed for pytorch_model.bin checkpoints

  state = torch.load(file, weights_only=True, map_location="cpu")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


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
          family: str) -> dict[str, np.ndarray]:
  """Every table row's HF tensor, shape-checked, converted into jaxft leaves of `want`."""
  missing = [r.hf for r in table if r.hf not in tensors]
  if missing:
    raise ValueError(f"{path} lacks {len(missing)} {family} tensor(s): {', '.join(missing[:8])}"
                     f"{' ...' if len(missing) > 8 else ''} (it has {len(tensors)} tensors; "
                     f"is it a {family} checkpoint with the layer count of its config.json?)")
  leaves: dict[str, np.ndarray] = {}
  for row in table:
    shapes = [tuple(want[p].shape) for p in row.jaxft]
    tensor = tensors[row.hf]
    if tuple(tensor.shape) != row.hf_shape(shapes):
      raise ValueError(f"HF tensor {row.hf!r} in {path} has shape {tuple(tensor.shape)} but the "
                       f"jaxft model expects {row.hf_shape(shapes)} (for {', '.join(row.jaxft)}); "
                       "the weights do not match the config the model was built from")
    for p, x in zip(row.jaxft, row.to_jaxft(tensor, shapes)):
      leaves[p] = x.astype(want[p].dtype)
  unfilled = set(want) - set(leaves)
  if unfilled:  # a jaxft parameter the table does not cover: a bug here, not the user's
    raise RuntimeError(f"no HF tensor maps to jaxft params {sorted(unfilled)}")
  return leaves


def _warn_unused(tensors, used, path, family, ignored=()):
  extra = [k for k in tensors if k not in used and not k.endswith(ignored)]
  if extra:
    log.warning("ignoring %d tensor(s) of %s that %s does not use: %s", len(extra), path,
                family, ", ".join(extra[:8]))


def load_hf_params(path: str, expected: Mapping) -> dict:
  """HF GPT-2 weights in directory `path` -> a numpy param tree shaped like `expected`.

  `expected` is the abstract param tree (e.g. `jax.eval_shape` of the unboxed init): its shapes
  are checked against every HF tensor and its dtypes are the ones returned.
  """
  tensors = _read_tensors(path)
  # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model saves "h.0...".
  tensors = {k.removeprefix(_GPT2_PREFIX): v for k, v in tensors.items()}
  want = dict(_flatten(expected))
  table = _TABLES["gpt2"](_n_layer(want))
  leaves = _fill(table, tensors, want, path, "GPT-2")
  if _TIED_HEAD in tensors and not np.array_equal(tensors[_TIED_HEAD], tensors["wte.weight"]):
    raise ValueError(f"{path} has an lm_head.weight that differs from wte.weight; jaxft's GPT-2 "
                     "ties the LM head to the token embedding and cannot load an untied head")
  _warn_unused(tensors, {r.hf for r in table} | {_TIED_HEAD}, path, "GPT-2",
               _GPT2_IGNORED_SUFFIXES)
  return _unflatten(leaves)


def load_bert_params(path: str, expected: Mapping) -> dict:
  """HF BertModel weights (bare, or the "bert." backbone of a BertFor* model) -> the param tree
  of a jaxft BertModel shaped like `expected`."""
  tensors = {k.removeprefix("bert."): v for k, v in _read_tensors(path).items()}
  want = dict(_flatten(expected))
  n_layer = len({p.split("/")[0] for p in want if p.startswith("layer_")})
  table = bert_table(n_layer)
  leaves = _fill(table, tensors, want, path, "BERT")
  _warn_unused(tensors, {r.hf for r in table}, path, "BertModel", ("position_ids",))
  return _unflatten(leaves)


def to_hf_tensors(params: Mapping, n_layer: int) -> dict[str, np.ndarray]:
  """jaxft params -> HF GPT2LMHeadModel state (float32, contiguous, "transformer."-prefixed)."""
  leaves = {p: np.asarray(jax.device_get(x), np.float32) for p, x in _flatten(params)}
  return {_GPT2_PREFIX + r.hf: r.to_hf([leaves[p] for p in r.jaxft])
          for r in _gpt2_table(n_layer)}


def save_hf(out_dir: str, params: Mapping, cfg: GPT2Config, tokenizer=None) -> None:
  """Writes config.json + model.safetensors (+ the tokenizer's files) for from_pretrained.

  lm_head.weight is left out, as transformers' own save_pretrained does: GPT2LMHeadModel ties it
  to transformer.wte.weight on load.
  """
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  eos_id = getattr(tokenizer, "eos_id", None)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(hf_config_dict(cfg, eos_id), f, indent=2, sort_keys=True)
  save_file(to_hf_tensors(params, cfg.n_layer), os.path.join(out_dir, SAFETENSORS_FILE),
            metadata={"format": "pt"})  # as transformers writes; older releases require it
  if tokenizer is not None:
    tokenizer.save(out_dir)
