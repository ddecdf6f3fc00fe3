"""--compile_only: the train step compiled for the configured mesh without running it, with
per-device memory figures that follow the mesh; TPU slices compiled from this CPU host."""

import importlib.util

import pytest

from jaxft import train
from jaxft.parallel import aot
from tests.helpers import train_config


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("aot")
  out = {}
  for name, mesh in (("data", dict(data=8, fsdp=1, tensor=1)),
                     ("fsdp", dict(data=1, fsdp=8, tensor=1)),
                     ("fsdp_tensor", dict(data=2, fsdp=2, tensor=2))):
    config = train_config(tmp, num_steps=10)
    config.mesh.update(mesh)
    out[name] = train.compile_only(config)
  return out


def test_compile_only_reports_memory_per_device(reports, capsys):
  r = reports["data"]
  assert r["compile_s"] > 0 and r["temp"] > 0
  assert r["argument"] >= r["train_state"] > 0  # the batch is an argument too
  assert r["peak_estimate"] == (r["argument"] + r["output"] - r["alias"] + r["temp"]
                                + r["generated_code"])


def test_sharding_the_state_shrinks_it_per_device(reports):
  # data-parallel replicates the state; FSDP splits its large leaves 8 ways.
  assert reports["fsdp"]["train_state"] < 0.3 * reports["data"]["train_state"]
  assert reports["fsdp"]["argument"] < reports["data"]["argument"]
  assert reports["fsdp_tensor"]["train_state"] < reports["data"]["train_state"]


def test_topology_names():
  assert aot.topology_name("v5e-16") == "v5e:4x4"
  assert aot.topology_name("v5litepod-8") == "v5e:2x4"
  assert aot.topology_name("v4-32") == "v4:2x2x4"  # 32 TensorCores = 16 chips
  assert aot.topology_name("v6e:2x2") == "v6e:2x2"
  with pytest.raises(ValueError, match=r"--topology='v9-8' is not a TPU slice name"):
    aot.topology_name("v9-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU slice needs `pip install libtpu` (not in CI)")
def test_compiles_for_a_tpu_slice_from_this_host(tmp_path):
  config = train_config(tmp_path, num_steps=10)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  r = train.compile_only(config, topology="v5e-8")
  assert r["temp"] > 0 and "device_bytes_limit" not in r


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU slice needs `pip install libtpu` (not in CI)")
def test_compiles_for_two_tpu_slices_from_this_host(tmp_path):
  """dcn_data=2 with --topology: the step compiles for 2 slices of the named topology, each
  slice one half of the data axis; the per-device state is that of fsdp=4 in a slice."""
  config = train_config(tmp_path, num_steps=10)
  config.mesh.update(data=1, fsdp=-1, dcn_data=2)
  two = train.compile_only(config, topology="v5e-4")
  config.mesh.update(dcn_data=1)
  one = train.compile_only(config, topology="v5e-4")
  assert two["train_state"] == one["train_state"] and two["temp"] > 0
