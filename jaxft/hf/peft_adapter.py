"""LoRA in Hugging Face PEFT's adapter format (adapter_config.json + adapter_model.safetensors),
both ways: what `peft.PeftModel.from_pretrained` reads and `save_pretrained` writes <-> the
"peft" collection of a jaxft LoRA run. In hf/, not peft/: every name and axis layout comes from
the tensor tables, and peft/ sits below hf/ in the layer order. Conventions (peft 0.22):
- PEFT adds lora_B(lora_A(dropout(x))) * lora_alpha / r to the base layer's output, jaxft
  dropout(x) A B * alpha / rank: r, lora_alpha, lora_dropout are config.peft.rank, alpha,
  dropout (rsLoRA's lora_alpha / sqrt(r) is read, never written).
- lora_A.weight is [r, in_features], lora_B.weight [out_features, r], whatever the base
  weight's layout (nn.Linear (out, in); GPT-2's Conv1D (in, out), with fan_in_fan_out). jaxft's
  A [*in, r] and B [r, *out] flatten their feature axes as the table row of the kernel they
  adapt flattens it, so each is a row of its own (`_lora_rows`).
- Keys: "base_model.model." + the module's name in the transformers class; modules_to_save
  weights (a classifier head) under the module's own name, as PEFT saves them.
"""

import json
import math
import os
import re

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxft import trees
from jaxft.hf.convert import _n_layer
from jaxft.hf.tables import ARCHITECTURES, BACKBONES, Row
from jaxft.peft.base import COLLECTION

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"\.lora_[AB]\.weight$")
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers one)
# config.task -> PEFT's task_type (it picks the PeftModel class; None: the plain PeftModel).
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS",
              "token_classification": "TOKEN_CLS", "question_answering": "QUESTION_ANS",
              "masked_lm": None}


class _Leaves:
  """A variable tree's leaves by per-layer path ("model/layers_3/attn/query/kernel"), whether
  or not config.model.scan_layers stacks the layers in one module ("model/layers/...", leaves
  [L, ...]): reads slice the stacked leaf, writes go into a copy of it."""

  def __init__(self, tree, arch):
    jp = f"{arch.jaxft_prefix}/" if arch.jaxft_prefix else ""
    stack = f"{jp}{BACKBONES[arch.family].layers}/"
    self.flat = trees.flat_paths(tree)
    self.where: dict[str, tuple[str, int | None]] = {}
    for path, x in self.flat.items():
      if not path.startswith(stack):
        self.where[path] = (path, None)
        continue
      for i in range(x.shape[0]):
        self.where[f"{stack[:-1]}_{i}/{path[len(stack):]}"] = (path, i)

  def shape(self, path: str) -> tuple[int, ...]:
    source, layer = self.where[path]
    return tuple(self.flat[source].shape)[0 if layer is None else 1:]

  def get(self, path: str) -> np.ndarray:
    source, layer = self.where[path]
    x = np.asarray(self.flat[source], np.float32)
    return x if layer is None else x[layer]

  def updated(self, values: dict[str, np.ndarray]) -> dict:
    """The tree with `values` (per-layer paths) written in, each in its leaf's dtype."""
    out = dict(self.flat)
    for path, value in values.items():
      source, layer = self.where[path]
      dtype = self.flat[source].dtype
      if layer is None:
        out[source] = value.astype(dtype)
        continue
      if out[source] is self.flat[source]:  # copy a stacked leaf once, before its first write
        out[source] = np.array(self.flat[source], dtype)
      out[source][layer] = value
    return trees.unflat_paths(out)


class _Model:
  """The task's model as PEFT sees it: its tensor rows and LoRA modules, by HF name."""

  def __init__(self, task, variables):
    self.task = task
    self.arch = ARCHITECTURES[task.architecture]
    self.params = _Leaves(variables["params"], self.arch)
    self.lora = _Leaves(variables.get(COLLECTION, {}), self.arch)
    n_layer = _n_layer(self.params.where, self.arch)
    self.rows = self.arch.rows(n_layer, with_hf_prefix=True, paths=self.params.where)
    # HF module name -> the row of its weight, for every Dense (what target_modules can name)
    self.dense = {r.hf.removesuffix(".weight"): r for r in self.rows
                  if r.hf.endswith(".weight") and r.jaxft[0].endswith("/kernel")}
    kernels = {p: r for r in self.dense.values() for p in r.jaxft}
    self.adapted = {}  # HF module name -> (lora_A row, lora_B row)
    for module in sorted({p.rsplit("/", 1)[0] for p in self.lora.where}):
      row = kernels.get(f"{module}/kernel")
      if row is None:  # a Dense the tables miss: a bug here, not the user's
        raise RuntimeError(f"no {task.architecture} weight holds {module}/kernel")
      self.check_unpacked(row)
      self.adapted[row.hf.removesuffix(".weight")] = _lora_rows(
          module, row, self.params.shape(f"{module}/kernel"),
          len(self.lora.shape(f"{module}/lora_a")) - 1)

  def check_unpacked(self, row: Row) -> None:
    if len(row.jaxft) > 1:
      packed = ", ".join(p.rsplit("/", 1)[0] for p in row.jaxft)
      raise ValueError(
          f"{self.task.architecture} packs {packed} into one module, {row.hf}: PEFT's "
          "LoRA on it has one lora_A shared by all of them, jaxft one A per kernel, so PEFT's "
          "format cannot hold this adapter at rank config.peft.rank. Adapt unpacked modules "
          f"only (config.peft.targets={self.task.peft.targets.pattern!r}; e.g. 'attn/out$|"
          "mlp/'), or export with --adapter_only (jaxft's format) or merged")

  def saved_rows(self) -> dict[str, list[Row]]:
    """{HF module: its rows} of the modules whose params the run trains besides LoRA (the task
    head, config.peft.trainable's): PEFT's modules_to_save, which holds whole modules."""
    peft, head = self.task.peft, self.task.trainable_head
    trained = {p for p, (source, _) in self.params.where.items() if peft.trains(source, head)}
    out: dict[str, list[Row]] = {}
    for row in self.rows:
      if set(row.jaxft) & trained:
        out.setdefault(row.hf.rsplit(".", 1)[0], []).append(row)
    trainable = f"config.peft.trainable={peft.cfg.get('trainable', '')!r}"
    for module, rows in out.items():
      if module in self.adapted:
        raise ValueError(f"{trainable} trains {module}, which LoRA adapts too: PEFT keeps a "
                         "module as a LoRA target or whole (modules_to_save), not both")
      frozen = sorted({p for r in rows for p in r.jaxft} - trained)
      if frozen:
        raise ValueError(f"{trainable} trains part of {module} (not {', '.join(frozen)}), and "
                         "PEFT saves whole modules (modules_to_save): select all its params")
    return out

  def local(self, name: str) -> str:
    """Without PEFT's and the backbone's prefix: BertModel's adapter fits BertFor* too."""
    return name.removeprefix(PREFIX).removeprefix(BACKBONES[self.arch.family].hf_prefix)


def _lora_rows(module: str, kernel: Row, kernel_shape: tuple, n_in: int) -> tuple[Row, Row]:
  """Rows for A [*in, r] -> lora_A [r, in] and B [r, *out] -> lora_B [out, r] that flatten the
  feature axes as `kernel`'s row flattens the kernel [*in, *out]."""
  merge = kernel.merge or tuple((i,) for i in range(len(kernel_shape)))
  if len(merge) != 2 or merge[0] != tuple(range(n_in)):  # a layout no PEFT Linear has
    raise ValueError(f"{kernel.hf} flattens {module}/kernel's axes as {merge}, which does not "
                     f"keep its {n_in} input axes apart from its output axes")
  name = PREFIX + kernel.hf.removesuffix(".weight")
  b_out = tuple(a - n_in + 1 for a in merge[1])  # B's output axes follow its rank axis
  return (Row(f"{name}.lora_A.weight", (f"{module}/lora_a",), (merge[0], (n_in,)), True),
          Row(f"{name}.lora_B.weight", (f"{module}/lora_b",), ((0,), b_out), True))


def _target_modules(adapted: set[str], candidates: set[str]) -> list[str]:
  """PEFT's target_modules: for each adapted module the shortest end of its name ("q_proj",
  "attn.c_proj") that selects adapted modules only (PEFT matches the ends of module names)."""
  out = set()
  for name in adapted:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
      end = ".".join(parts[-k:])
      if all(c in adapted for c in candidates if c == end or c.endswith("." + end)):
        break
    out.add(end)
  return sorted(out)


def _check_method(task, verb: str) -> None:
  name = task.peft.name
  if name != "lora":
    why = {"none": " (full fine-tuning: no adapter)", "adalora": " (AdaLoRA's P diag(E) Q "
           "with a rank budget is PEFT's ADALORA type)"}.get(name, "")
    raise ValueError(f"config.peft.method={name!r}{why}: only LoRA (config.peft.method='lora') "
                     f"{verb} Hugging Face PEFT's LORA adapter format; export other methods "
                     "with --adapter_only (jaxft's own format)")


def save_peft_adapter(out_dir: str, task, variables, base_model_path: str = "") -> list[str]:
  """Writes the LoRA of `variables` ({"params", "peft"}; params may be abstract except the
  trained ones) as a PEFT adapter directory; returns the files written."""
  _check_method(task, "writes")
  model = _Model(task, variables)
  tensors = {row.hf: row.to_hf([model.lora.get(row.jaxft[0])])
             for rows in model.adapted.values() for row in rows}
  saved = model.saved_rows()
  for row in (r for rows in saved.values() for r in rows):
    tensors[PREFIX + row.hf] = row.to_hf([model.params.get(p) for p in row.jaxft])
  alpha = float(task.peft.cfg.alpha)
  config = {
      "peft_type": "LORA", "task_type": TASK_TYPES.get(task.name),
      "r": task.peft.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
      "lora_dropout": float(task.peft.cfg.dropout), "use_rslora": False, "bias": "none",
      "target_modules": _target_modules(set(model.adapted), set(model.dense)),
      # GPT-2's Conv1D keeps (in, out) weights (a row without transpose); PEFT must know.
      "fan_in_fan_out": any(not model.dense[m].transpose for m in model.adapted),
      "modules_to_save": sorted(saved) or None, "inference_mode": True,
      "base_model_name_or_path": base_model_path or task.config.get("init_from", "") or None,
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  return [CONFIG_FILE, WEIGHTS_FILE]


def _read_config(path: str, task) -> dict:
  """adapter_config.json: the LoRA function config.peft gives, or an error naming the field."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a Hugging Face PEFT adapter")
  with open(file) as f:
    config = json.load(f)
  if (kind := config.get("peft_type")) != "LORA":
    raise ValueError(f"{file} is a PEFT {kind} adapter; jaxft reads LoRA adapters (peft_type "
                     "LORA) only")
  r, lora_alpha = int(config["r"]), float(config.get("lora_alpha", 8))
  # rsLoRA scales by lora_alpha / sqrt(r), jaxft by alpha / rank: the alpha giving that scale.
  alpha = lora_alpha * math.sqrt(r) if config.get("use_rslora") else lora_alpha
  if r != task.peft.rank:
    raise ValueError(f"{file} has r={r} but config.peft.rank={task.peft.rank}; set "
                     f"config.peft.rank={r}")
  if not math.isclose(alpha, float(task.peft.cfg.alpha), rel_tol=1e-6):
    raise ValueError(f"{file} scales LoRA by {alpha / r:g} (lora_alpha={lora_alpha:g}"
                     f"{', rsLoRA' if config.get('use_rslora') else ''}) but config.peft.alpha="
                     f"{task.peft.cfg.alpha} / rank gives {task.peft.scale:g}; set "
                     f"config.peft.alpha={alpha:g}")
  unsupported = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
                 "use_dora": "DoRA's magnitude vectors", "lora_bias": "LoRA biases",
                 "bias": "trained base biases"}
  for field, what in unsupported.items():
    if config.get(field) not in (None, False, {}, "none"):
      raise ValueError(f"{file} sets {field}={config[field]!r} ({what}), which jaxft's LoRA "
                       "does not have")
  return config


def _check_modules(tensors: dict, model: _Model, file: str) -> None:
  """The adapter adapts exactly the modules config.peft.targets selects in this model."""
  dense = {model.local(n): n for n in model.dense}
  theirs = {model.local(k).rsplit(".", 2)[0] for k in tensors if _LORA_KEY.search(k)}
  lacking = sorted(theirs - set(dense))
  if lacking:
    raise ValueError(f"{file} adapts {', '.join(lacking[:6])}, which {model.task.architecture} "
                     "does not have: was the adapter trained on another model?")
  for name in sorted(theirs):
    model.check_unpacked(model.dense[dense[name]])
  ours = {model.local(n) for n in model.adapted}
  if theirs != ours:
    differ = sorted(theirs ^ ours)
    # A config.peft.targets regex for the adapter's modules: their jaxft paths inside a layer.
    layer = rf"^(.*/)?{BACKBONES[model.arch.family].layers}_[0-9]+/"
    paths = {re.sub(layer, "", model.dense[dense[n]].jaxft[0]) for n in theirs}
    raise ValueError(
        f"{file} adapts {len(theirs)} modules and config.peft.targets="
        f"{model.task.peft.targets.pattern!r} {len(ours)} of this model; they differ at "
        f"{', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}: set config.peft.targets "
        f"to the adapter's modules (e.g. '({'|'.join(sorted(paths)).replace('/kernel', '')})$')")


def load_peft_adapter(path: str, task, variables) -> dict:
  """The variables with the LoRA of the PEFT adapter in directory `path` (and the weights of
  its modules_to_save, e.g. a classifier head, in "params"); numpy leaves."""
  _check_method(task, "reads")
  _read_config(path, task)
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
  tensors = load_file(file)
  model = _Model(task, variables)
  _check_modules(tensors, model, file)
  found_params, found_lora = {}, {}  # modules_to_save (head) weights, LoRA
  rows = {model.local(r.hf): (r, model.params, found_params) for r in model.rows}
  rows.update({model.local(r.hf): (r, model.lora, found_lora)
               for pair in model.adapted.values() for r in pair})
  for key, tensor in tensors.items():
    row, leaves, found = rows.get(model.local(key), (None, None, None))
    if row is None or not key.startswith(PREFIX):
      raise ValueError(f"{file} holds {key}, which {task.architecture} has no place for (a "
                       "head of another task, or not a PEFT key): was the adapter trained on "
                       "another model or task?")
    shapes = [leaves.shape(p) for p in row.jaxft]
    if tuple(tensor.shape) != row.hf_shape(shapes):
      raise ValueError(f"{key} in {file} has shape {tuple(tensor.shape)} but this model's "
                       f"{', '.join(row.jaxft)} needs {row.hf_shape(shapes)}; was the adapter "
                       "trained on another base model?")
    found.update(zip(row.jaxft, row.to_jaxft(tensor.astype(np.float32), shapes)))
  if unfilled := sorted(set(model.lora.where) - set(found_lora)):
    raise ValueError(f"{file} lacks {', '.join(unfilled[:6])} (a lora_A without its lora_B?)")
  # Only where the run trains (the head, config.peft.trainable's): a frozen base is rebuilt
  # from config.init_from alone when the run resumes or is opened.
  head = task.trainable_head
  frozen = sorted(p for p in found_params if not task.peft.trains(model.params.where[p][0], head))
  if frozen:
    raise ValueError(f"{file} saves {', '.join(frozen[:6])} (modules_to_save), which this run "
                     "would freeze; add them to config.peft.trainable (now "
                     f"{task.peft.cfg.get('trainable', '')!r})")
  out = {**variables, COLLECTION: model.lora.updated(found_lora)}
  if found_params:
    out["params"] = model.params.updated(found_params)
  return out

