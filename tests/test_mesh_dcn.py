"""Multi-slice meshes (config.mesh.dcn_*): shapes inside and across slices, the errors a config
can cause, and where the devices of each slice land. One process; the 2-process run is in
tests/test_distributed.py."""

import logging
import types

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from jaxft.parallel import sharding


def mesh_config(**sizes):
  m = common.mesh()
  m.update(sizes)
  return m


@pytest.mark.parametrize("sizes,devices,ici,dcn", [
    ({}, 8, (8, 1, 1), (1, 1, 1)),
    ({"fsdp": 2, "dcn_data": 2}, 8, (2, 2, 1), (2, 1, 1)),
    ({"data": 1, "fsdp": -1, "dcn_data": 2}, 512, (1, 256, 1), (2, 1, 1)),  # 2 x v5e-256
    ({"data": 2, "fsdp": -1, "dcn_fsdp": 2}, 8, (2, 2, 1), (1, 2, 1)),
    ({"dcn_data": 2, "dcn_tensor": 2}, 8, (2, 1, 1), (2, 1, 2)),
    ({"data": 1, "tensor": 2, "dcn_data": 4}, 8, (1, 1, 2), (4, 1, 1)),
])
def test_shape_inside_and_across_slices(sizes, devices, ici, dcn):
  cfg = mesh_config(**sizes)
  assert sharding.resolve_hybrid_shape(cfg, devices) == (ici, dcn)
  # Callers that want the mesh itself (aot, train, tests) get the total per axis.
  assert sharding.resolve_mesh_shape(cfg, devices) == tuple(i * d for i, d in zip(ici, dcn))


def test_configs_without_dcn_fields_are_one_slice():
  """Configs saved before the dcn_* fields (and the loader's 1-device mesh) still resolve."""
  old = ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1})
  assert sharding.resolve_hybrid_shape(old, 8) == ((4, 2, 1), (1, 1, 1))
  assert sharding.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


@pytest.mark.parametrize("sizes,devices,message", [
    ({"dcn_data": 0}, 8, r"config.mesh.dcn_data=0: .* must be positive integers"),
    ({"dcn_fsdp": -1}, 8, r"config.mesh.dcn_fsdp=-1: .* -1 \('the rest'\) is only for "
     r"data/fsdp/tensor"),
    ({"dcn_tensor": 1.5}, 8, r"config.mesh.dcn_tensor=1.5: .* positive integers"),
    ({"dcn_data": 3}, 8, r"span 3 slices, which does not divide the 8 devices; set dcn_data \* "
     r"dcn_fsdp \* dcn_tensor to the number of slices"),
    ({"fsdp": 3, "dcn_data": 2}, 8, r"the fixed axes multiply to 3, which does not divide the 4 "
     r"devices of one slice \(8 devices / 2 slices from config.mesh.dcn_\*\)"),
    ({"data": 2, "dcn_data": 2}, 8, r"needs 2 devices per slice but a slice has 4 .* set one of "
     r"them to -1"),
    ({"data": -1, "fsdp": -1, "dcn_data": 2}, 8, r"at most one -1"),
])
def test_bad_dcn_configs_name_the_field_and_the_fix(sizes, devices, message):
  cfg = {**common.mesh().to_dict(), **sizes}  # a dict: ConfigDict would refuse 1.5 itself
  with pytest.raises(ValueError, match=message):
    sharding.resolve_hybrid_shape(cfg, devices)


def fake_devices(processes, per_process, slices=None):
  """Stand-ins with what mesh_utils reads; `slices` adds a TPU-style slice_index."""
  out = []
  for p in range(processes):
    for i in range(per_process):
      d = types.SimpleNamespace(id=p * 100 + i, process_index=p, platform="cpu",
                                device_kind="cpu")
      if slices:
        d.slice_index = p * slices // processes
      out.append(d)
  return out


def test_each_process_is_a_data_block_when_processes_are_the_slices():
  devices = fake_devices(2, 4)
  array = sharding.hybrid_devices((2, 2, 1), (2, 1, 1), devices)
  procs = np.vectorize(lambda d: d.process_index)(array)
  assert array.shape == (4, 2, 1)
  assert (procs[:2] == 0).all() and (procs[2:] == 1).all()
  assert sorted(d.id for d in array.flat) == sorted(d.id for d in devices)


def test_consecutive_processes_form_a_slice_when_there_are_more_processes_than_slices():
  """One process per GPU, 2 nodes x 2 GPUs (SLURM ranks node by node): dcn_data=2 makes
  each node, processes 0-1 and 2-3, one slice and one half of the data axis."""
  devices = fake_devices(4, 1)
  array = sharding.hybrid_devices((1, 2, 1), (2, 1, 1), devices)
  procs = np.vectorize(lambda d: d.process_index)(array)
  assert array.shape == (2, 2, 1)
  assert sorted(procs[0].flat) == [0, 1] and sorted(procs[1].flat) == [2, 3]


def test_slices_group_by_slice_index_not_by_process():
  """4 hosts in 2 TPU-style slices, dcn across fsdp: each slice fills its own fsdp half."""
  devices = fake_devices(4, 2, slices=2)
  array = sharding.hybrid_devices((2, 2, 1), (1, 2, 1), devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(array)
  assert array.shape == (2, 4, 1)
  assert (slice_of[:, :2] == 0).all() and (slice_of[:, 2:] == 1).all()


def test_one_slice_keeps_make_mesh_unchanged():
  assert sharding.hybrid_devices((8, 1, 1), (1, 1, 1), fake_devices(2, 4)) is None
  cfg = mesh_config(data=2, fsdp=2, tensor=2)
  expected = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, devices=jax.devices(),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert sharding.make_mesh(cfg) == expected


def test_devices_that_span_slices_with_dcn_all_one_warn(caplog):
  with caplog.at_level(logging.WARNING, logger="jaxft.parallel.sharding"):
    assert sharding.hybrid_devices((8, 1, 1), (1, 1, 1), fake_devices(2, 4, slices=2)) is None
  assert "span 2 TPU slices but config.mesh.dcn_* are all 1: set config.mesh.dcn_data=2" in (
      caplog.text)


@pytest.mark.parametrize("devices,dcn,message", [
    (fake_devices(1, 8), (2, 1, 1), r"span 2 slices but the 8 devices form 1 slices of "
     r"processes \(on CPU/GPU a slice is a process.*\); make dcn_data \* dcn_fsdp \* "
     r"dcn_tensor equal 1"),
    (fake_devices(3, 2), (2, 1, 1), r"span 2 slices but the 6 devices form 3 slices of "
     r"processes"),
    (fake_devices(4, 2, slices=2), (4, 1, 1), r"span 4 slices but the 8 devices form 2 "
     r"slices; make dcn_data \* dcn_fsdp \* dcn_tensor equal 2"),
    (fake_devices(1, 6) + fake_devices(2, 2)[2:], (2, 1, 1), r"needs equal slices, but the "
     r"slices of processes .* hold \[6, 2\] devices"),
])
def test_slice_count_must_match_the_devices(devices, dcn, message):
  with pytest.raises(ValueError, match=message):
    sharding.hybrid_devices((4, 1, 1), dcn, devices)


def test_make_mesh_logs_ici_times_dcn_and_checks_the_real_devices(caplog):
  with caplog.at_level(logging.INFO, logger="jaxft.parallel.sharding"):
    sharding.make_mesh(mesh_config(fsdp=2))
  assert "mesh data=4 (ici 4 x dcn 1), fsdp=2 (ici 2 x dcn 1), tensor=1 (ici 1 x dcn 1) over " \
         "1 slice(s) of 8 devices" in caplog.text
  # One process of 8 CPU devices is one slice: two slices cannot be laid out on it.
  with pytest.raises(ValueError, match=r"span 2 slices but the 8 devices form 1 slices of "):
    sharding.make_mesh(mesh_config(fsdp=2, dcn_data=2))
