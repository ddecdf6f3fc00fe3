"""Hugging Face <-> jaxft parameters: one table row per HF tensor, read and written generically.

A row names an HF tensor, the jaxft leaves it becomes and how the axes map. HF GPT-2 uses
Conv1D, whose weight is (in, out): the same layout as a flax kernel, so no GPT-2 row needs a
transpose; c_attn packs q, k and v along its output axis and jaxft keeps them as separate
[embed, heads, head_dim] kernels. BERT's nn.Linear weights are (out, in): transposed. Each
transformers class (GPT2LMHeadModel, BertForSequenceClassification, ...) is an `Arch`: a
backbone table under a prefix plus its head rows. The readers, writers and shape checks are
shared. config.json lives in `jaxft.hf_config`.
"""

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from jaxft.hf_config import (  # noqa: F401 (re-exported: hf.read_hf_config etc.)
    CONFIG_FILE,
    bert_config_dict,
    gpt2_config_dict,
    label_names,
    model_overrides,
    read_hf_config,
)

log = logging.getLogger("jaxft")

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"


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


def _linear(hf: str, jaxft: str, merge=None) -> list[Row]:
  """An HF nn.Linear (weight (out, in), bias) <-> a flax Dense/DenseGeneral (kernel, bias)."""
  return [Row(f"{hf}.weight", (f"{jaxft}/kernel",), merge=merge, transpose=True),
          Row(f"{hf}.bias", (f"{jaxft}/bias",), merge=None if merge is None else ((0, 1),))]


def _layer_norm(hf: str, jaxft: str) -> list[Row]:
  return [Row(f"{hf}.weight", (f"{jaxft}/scale",)), Row(f"{hf}.bias", (f"{jaxft}/bias",))]


def _gpt2_backbone(n_layer: int, pooler: bool = False) -> list[Row]:
  """HF GPT2Model <-> jaxft GPT2Model (Conv1D weights are (in, out): no transposes)."""
  del pooler  # GPT-2 has none
  rows = [Row("wte.weight", ("wte/embedding",)), Row("wpe.weight", ("wpe/embedding",))]
  for i in range(n_layer):
    h, j = f"h.{i}", f"h_{i}"
    rows += [
        *_layer_norm(f"{h}.ln_1", f"{j}/ln_1"),
        Row(f"{h}.attn.c_attn.weight",
            (f"{j}/attn/query/kernel", f"{j}/attn/key/kernel", f"{j}/attn/value/kernel"),
            merge=((0,), (1, 2))),  # 3 x [embed, heads, head_dim] -> [embed, 3 * embed]
        Row(f"{h}.attn.c_attn.bias",
            (f"{j}/attn/query/bias", f"{j}/attn/key/bias", f"{j}/attn/value/bias"),
            merge=((0, 1),)),  # 3 x [heads, head_dim] -> [3 * embed]
        Row(f"{h}.attn.c_proj.weight", (f"{j}/attn/out/kernel",),
            merge=((0, 1), (2,))),  # [heads, head_dim, embed] -> [embed, embed]
        Row(f"{h}.attn.c_proj.bias", (f"{j}/attn/out/bias",)),
        *_layer_norm(f"{h}.ln_2", f"{j}/ln_2"),
        Row(f"{h}.mlp.c_fc.weight", (f"{j}/mlp/fc/kernel",)),
        Row(f"{h}.mlp.c_fc.bias", (f"{j}/mlp/fc/bias",)),
        Row(f"{h}.mlp.c_proj.weight", (f"{j}/mlp/proj/kernel",)),
        Row(f"{h}.mlp.c_proj.bias", (f"{j}/mlp/proj/bias",)),
    ]
  return rows + _layer_norm("ln_f", "ln_f")


def _bert_backbone(n_layer: int, pooler: bool = True) -> list[Row]:
  """HF BertModel <-> jaxft BertModel (nn.Linear weights are (out, in): transposed)."""
  rows = [Row("embeddings.word_embeddings.weight", ("word/embedding",)),
          Row("embeddings.position_embeddings.weight", ("position/embedding",)),
          Row("embeddings.token_type_embeddings.weight", ("token_type/embedding",)),
          *_layer_norm("embeddings.LayerNorm", "ln_embed")]
  for i in range(n_layer):
    h, j = f"encoder.layer.{i}", f"layer_{i}"
    for name in ("query", "key", "value"):  # [embed, heads, head_dim] <- [embed, embed]
      rows += _linear(f"{h}.attention.self.{name}", f"{j}/attn/{name}", ((0,), (1, 2)))
    rows += [Row(f"{h}.attention.output.dense.weight", (f"{j}/attn/out/kernel",),
                 merge=((0, 1), (2,)), transpose=True),  # [heads, head_dim, embed]
             Row(f"{h}.attention.output.dense.bias", (f"{j}/attn/out/bias",)),
             *_layer_norm(f"{h}.attention.output.LayerNorm", f"{j}/attn/ln"),
             *_linear(f"{h}.intermediate.dense", f"{j}/mlp/fc"),
             *_linear(f"{h}.output.dense", f"{j}/mlp/proj"),
             *_layer_norm(f"{h}.output.LayerNorm", f"{j}/ln")]
  if pooler:
    rows += _linear("pooler.dense", "pooler")
  return rows


@dataclasses.dataclass(frozen=True)
class Arch:
  """How one transformers class lays out its tensors relative to the jaxft module.

  The backbone sits under `hf_prefix` in HF names and `jaxft_prefix` in jaxft paths; `head`
  rows are top-level in both. A checkpoint of another class of the same family (e.g. a bare
  BertModel for a BertForSequenceClassification) fills the backbone; the head and the pooler
  may be absent from it and are then newly initialised, as transformers does. `tied` names HF
  tensors that duplicate another one (checked equal, never loaded twice).
  """

  family: str
  hf_prefix: str
  jaxft_prefix: str
  pooler: bool = False
  head: tuple[Row, ...] = ()
  tied: tuple[tuple[str, str], ...] = ()

  def rows(self, n_layer: int, with_hf_prefix: bool) -> list[Row]:
    backbone = _BACKBONES[self.family](n_layer, self.pooler)
    hp = f"{self.hf_prefix}." if self.hf_prefix and with_hf_prefix else ""
    jp = f"{self.jaxft_prefix}/" if self.jaxft_prefix else ""
    return [Row(hp + r.hf, tuple(jp + p for p in r.jaxft), r.merge, r.transpose)
            for r in backbone] + list(self.head)

  def optional(self, n_layer: int) -> set[str]:
    """jaxft paths a checkpoint of a sibling class may lack: the head and the pooler."""
    jp = f"{self.jaxft_prefix}/" if self.jaxft_prefix else ""
    paths = {p for r in self.head for p in r.jaxft}
    if self.pooler:
      paths |= {jp + p for r in _linear("pooler.dense", "pooler") for p in r.jaxft}
    return paths


_BACKBONES = {"gpt2": _gpt2_backbone, "bert": _bert_backbone}
_BACKBONE_PREFIX = {"gpt2": "transformer.", "bert": "bert."}
_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
ARCHITECTURES = {
    "GPT2LMHeadModel": Arch("gpt2", "transformer", "transformer",
                            tied=(("lm_head.weight", "transformer.wte.weight"),)),
    "GPT2ForSequenceClassification": Arch(
        "gpt2", "transformer", "transformer",
        head=(Row("score.weight", ("score/kernel",), transpose=True),)),
    "BertModel": Arch("bert", "", "", pooler=True),
    "BertForMaskedLM": Arch(
        "bert", "bert", "bert",
        head=(*_linear("cls.predictions.transform.dense", "mlm_transform"),
              *_layer_norm("cls.predictions.transform.LayerNorm", "mlm_ln"),
              Row("cls.predictions.bias", ("mlm_bias",))),
        tied=(("cls.predictions.decoder.weight", _WORD_EMBEDDINGS),
              ("cls.predictions.decoder.bias", "cls.predictions.bias"))),
    "BertForSequenceClassification": Arch("bert", "bert", "bert", pooler=True,
                                          head=tuple(_linear("classifier", "classifier"))),
    "BertForTokenClassification": Arch("bert", "bert", "bert",
                                       head=tuple(_linear("classifier", "classifier"))),
    "BertForQuestionAnswering": Arch("bert", "bert", "bert",
                                     head=tuple(_linear("qa_outputs", "qa_outputs"))),
}
# Tensors some HF checkpoints carry that are buffers, not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids")


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


def _n_layer(leaf_paths, arch: Arch) -> int:
  marker = "h_" if arch.family == "gpt2" else "layer_"
  prefix = f"{arch.jaxft_prefix}/" if arch.jaxft_prefix else ""
  return len({p.removeprefix(prefix).split("/")[0] for p in leaf_paths
              if p.startswith(prefix + marker)})


# config.model.scan_layers keeps the layers as one nn.scan module ("h" / "layer") whose leaves
# have a leading layer axis; the tables are written per layer ("h_3"). These convert.
_STACKED = {"gpt2": "h", "bert": "layer"}


def _stack_prefix(arch: Arch) -> str:
  jp = f"{arch.jaxft_prefix}/" if arch.jaxft_prefix else ""
  return f"{jp}{_STACKED[arch.family]}/"


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


def _check_tied(tensors, arch: Arch, path: str) -> None:
  for copy, source in arch.tied:
    if copy in tensors and source in tensors and not np.array_equal(tensors[copy],
                                                                    tensors[source]):
      raise ValueError(f"{path} has a {copy} that differs from {source}; jaxft ties them (as "
                       "transformers does by default) and cannot load an untied checkpoint")


def _backbone_names(tensors: dict, arch: Arch) -> dict:
  """Strips the backbone prefix whichever class saved the file ("bert.x" and "x" both -> "x"),
  keeping head tensors (classifier.*, cls.*, score.*, lm_head.*) as they are."""
  prefix = _BACKBONE_PREFIX[arch.family]
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
  family = {"gpt2": "GPT-2", "bert": "BERT"}[arch.family]
  raw = _read_tensors(path) if tensors is None else tensors
  _check_tied(raw, arch, path)
  tensors = _backbone_names(raw, arch)
  want = dict(_flatten(expected))
  stacked = _is_stacked(want, arch)
  if stacked:
    want = _unstack(want, arch, lambda s, i: jax.ShapeDtypeStruct(s.shape[1:], s.dtype))
  n_layer = _n_layer(want, arch)
  table = arch.rows(n_layer, with_hf_prefix=False)
  leaves, newly = _fill(table, tensors, want, path, family, arch.optional(n_layer))
  if newly:
    if init_fn is None:
      raise ValueError(f"{path} has no weights for {', '.join(newly)}; it is not a "
                       f"{architecture} checkpoint")
    log.warning("%s has no weights for %s: newly initialised (train them before use)", path,
                ", ".join(newly))
    initial = dict(_flatten(jax.device_get(init_fn())))
    leaves.update({p: np.asarray(initial[p], want[p].dtype) for p in newly})
  prefix = _BACKBONE_PREFIX[arch.family]
  used = {r.hf for r in table} | {copy.removeprefix(prefix) for copy, _ in arch.tied}
  _warn_unused(tensors, used, path, architecture, _IGNORED_SUFFIXES)
  return _unflatten(_stack(leaves, arch, n_layer) if stacked else leaves)


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
  leaves = {p: np.asarray(jax.device_get(x), np.float32) for p, x in _flatten(params)}
  if _is_stacked(leaves, arch):
    leaves = _unstack(leaves, arch)
  n_layer = _n_layer(leaves, arch)
  return {r.hf: r.to_hf([leaves[p] for p in r.jaxft])
          for r in arch.rows(n_layer, with_hf_prefix=True)}


def config_dict(cfg, tokenizer=None, architecture: str = "GPT2LMHeadModel",
                labels: list[str] | None = None) -> dict:
  """The config.json of `architecture` for this model, with the special ids jaxft pads with
  (GPT-2: EOS, which GPT2ForSequenceClassification must skip; BERT: [PAD])."""
  if ARCHITECTURES[architecture].family == "gpt2":
    return gpt2_config_dict(cfg, getattr(tokenizer, "eos_id", None), architecture, labels)
  pad = tokenizer.special_id("pad_token") if tokenizer and "pad_token" in tokenizer.special else 0
  return bert_config_dict(cfg, architecture, labels, pad)


def save_hf(out_dir: str, params: Mapping, cfg, tokenizer=None,
            architecture: str = "GPT2LMHeadModel", labels: list[str] | None = None) -> None:
  """Writes config.json + model.safetensors (+ the tokenizer's files) for from_pretrained."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  config = config_dict(cfg, tokenizer, architecture, labels)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(to_hf_tensors(params, architecture), os.path.join(out_dir, SAFETENSORS_FILE),
            metadata={"format": "pt"})  # as transformers writes; older releases require it
  if tokenizer is not None:
    tokenizer.save(out_dir)
