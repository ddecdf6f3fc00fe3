"""A quantised run's weights on disk: one safetensors file beside the run's config.json (with its
"quantization" block) and labels.json.

    quantized.safetensors
      "<param path>"        a float parameter (norm scales, biases), as trained
      "<param path>.q"      int8 values (8 bits) or uint8 packed nibbles (4 bits)
      "<param path>.scale"  float32 scales
      metadata["jaxft.quant"]  JSON {param path: {shape, dtype, bits, kind, n_batch, n_in}}

Loading gives back exactly the QArrays that were saved (bit for bit), checked against the
model's own parameter paths and shapes.
"""

import json
import os

import jax
import numpy as np
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxft import trees
from jaxft.quant import core, model

WEIGHTS_FILE = "quantized.safetensors"
_META = "jaxft.quant"


def is_quantized(path: str) -> bool:
  """A directory written by python -m jaxft.quantize (its config.json has "quantization")."""
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  with open(cfg) as f:
    return bool(json.load(f).get("quantization"))


def weight_bytes(tree) -> int:
  """Bytes the variables hold in memory (a QArray: its int values plus its scales)."""
  return trees.nbytes(tree)


def save_weights(out: str, variables: dict) -> str:
  """Writes variables["params"] (QArrays and floats) to out/quantized.safetensors."""
  tensors, meta = {}, {}
  for path, x in trees.flat(variables["params"]).items():
    name = trees.path_str(path)
    if model.is_qarray(x):
      tensors[name + ".q"] = np.asarray(x.values)
      tensors[name + ".scale"] = np.asarray(x.scale)
      meta[name] = {"shape": list(x.shape), "dtype": x.dtype, "bits": x.bits,
                    "kind": x.layout.kind, "n_batch": x.layout.n_batch, "n_in": x.layout.n_in}
    else:
      tensors[name] = np.asarray(x)
  file = os.path.join(out, WEIGHTS_FILE)
  save_file(tensors, file, metadata={_META: json.dumps(meta)})
  return file


def read_weights(path: str) -> dict:
  """{"params": ...} of a quantised directory, on the host (QArrays hold numpy arrays)."""
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has a quantised config.json but no {WEIGHTS_FILE}; "
                            "quantise the run again (python -m jaxft.quantize)")
  with safe_open(file, framework="numpy") as f:
    meta = json.loads((f.metadata() or {}).get(_META, "{}"))
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
  leaves = {}
  for name, m in meta.items():
    layout = core.Layout(m["kind"], m["n_batch"], m["n_in"])
    leaves[name] = core.QArray(tensors.pop(name + ".q"), tensors.pop(name + ".scale"),
                               tuple(m["shape"]), m["dtype"], m["bits"], layout)
  leaves.update(tensors)
  return {"params": trees.unflat_paths(leaves)}


def check_matches(params, task, path: str) -> None:
  """The file's parameters are the task model's: same paths, same (dequantised) shapes."""
  abstract = nn.unbox(jax.eval_shape(
      lambda: task.init(jax.random.key(0), min(8, task.config.seq_len))))["params"]
  want = {trees.path_str(k): tuple(v.shape) for k, v in trees.flat(abstract).items()}
  have = {trees.path_str(k): tuple(v.shape) for k, v in trees.flat(params).items()}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:6]
    raise ValueError(f"{path}/{WEIGHTS_FILE} does not hold the parameters of the model its "
                     f"config.json describes (first differences: {diff}); quantise the run "
                     "again with python -m jaxft.quantize")


def load_variables(path: str, task) -> dict:
  """The quantised variables of `path` on this process's first device, with `task` set to run
  on them (model.attach)."""
  variables = read_weights(path)
  check_matches(variables["params"], task, path)
  model.attach(task)
  return jax.device_put(variables, jax.local_devices()[0])
