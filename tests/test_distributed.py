"""Multi-process runs on 127.0.0.1 (jax.distributed over gloo): 2 processes x 4 CPU devices
train exactly as 1 process x 8 devices, checkpoints move between process counts and mesh
shapes, and a process that dies stops the others instead of leaving them blocked."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxft.parallel import distributed
from jaxft.run import workdir as workdir_lib
from launch import local
from tests.helpers import ROOT, write_corpus

STEPS = 6


def _args(tmp_path, workdir, *extra):
  return ["--config", "configs/gpt2.py:tiny", "--workdir", str(workdir),
          f"--config.data.files={tmp_path / 'corpus'}/*.txt",
          f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.num_steps={STEPS}",
          "--config.log_every=1", "--config.eval_every=3", "--config.checkpoint_every=3",
          "--config.sample.max_new_tokens=0", *extra]


def _losses(workdir) -> dict[int, float]:
  """step -> training loss of metrics.jsonl, where each step has at most one training row (a
  resumed run that trained steps again would log them twice)."""
  rows = [r for r in workdir_lib.read_metrics(workdir) if "train/loss" in r]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), steps
  return {r["step"]: r["train/loss"] for r in rows}


def _run(tmp_path, workdir, processes: int, *extra):
  """The user's commands: python -m launch.local, or python -m jaxft.train alone."""
  if processes > 1:
    cmd = [sys.executable, "-m", "launch.local", f"--num_processes={processes}",
           f"--devices_per_process={8 // processes}", "--grace_s=5", "--",
           *_args(tmp_path, workdir, *extra)]
  else:
    cmd = [sys.executable, "-m", "jaxft.train", *_args(tmp_path, workdir, *extra)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8",
         "JAXFT_HEARTBEAT_TIMEOUT_S": "10"}
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same tiny GPT-2 run with 1 process x 8 devices and with 2 processes x 4."""
  tmp = tmp_path_factory.mktemp("distributed")
  write_corpus(str(tmp / "corpus"))
  one, two = tmp / "one", tmp / "two"
  _run(tmp, one, 1)
  _run(tmp, two, 2)
  return tmp, one, two


def test_two_processes_train_as_one(runs):
  _, one, two = runs
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0,
                             atol=1e-5)
  info = json.load(open(os.path.join(two, "run_info.json")))
  assert info["process_count"] == 2 and len(info["devices"]) == 8


@pytest.mark.parametrize("source,processes,mesh", [
    ("two", 1, ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")),
    ("one", 2, ("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2")),
])
def test_checkpoints_resume_across_process_counts_and_meshes(runs, source, processes, mesh):
  """Drop the step-6 checkpoint of one run and resume it from step 3 with the other process
  count on another mesh: steps 4-6 give the losses of the uninterrupted run."""
  tmp, one, two = runs
  straight = {"one": one, "two": two}[source]
  resumed = tmp / f"{source}-resumed-{processes}"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  out = _run(tmp, resumed, processes, *mesh)
  assert f"resumed from step 3 in {resumed}/checkpoints" in out.stdout + out.stderr
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == list(range(1, STEPS + 1))  # steps 4-6 once more, after 1-3 of the copy
  np.testing.assert_allclose([b[s] for s in range(4, STEPS + 1)],
                             [a[s] for s in range(4, STEPS + 1)], rtol=0, atol=1e-5)


# 2 slices (here: processes) of 4 devices: the in-slice mesh, the dcn split, the same total
# mesh as one process of 8 devices, and the split the log line shows.
MULTISLICE = {
    "dcn_data": (("--config.mesh.data=-1", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2"),
                 ("--config.mesh.data=4", "--config.mesh.fsdp=2"),
                 "mesh data=4 (ici 2 x dcn 2), fsdp=2 (ici 2 x dcn 1)"),
    "dcn_fsdp": (("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.dcn_fsdp=2"),
                 ("--config.mesh.data=1", "--config.mesh.fsdp=8"),
                 "mesh data=1 (ici 1 x dcn 1), fsdp=8 (ici 4 x dcn 2)"),
}


@pytest.mark.parametrize("split", list(MULTISLICE))
def test_two_slices_train_as_one_process_on_the_same_mesh(tmp_path, split):
  """dcn_data=2 (or dcn_fsdp=2) over 2 processes x 4 devices (each process a slice, as on
  CPU/GPU) gives the per-step losses of 1 process x 8 devices on the same total mesh."""
  sliced_args, flat_args, logged = MULTISLICE[split]
  write_corpus(str(tmp_path / "corpus"))
  flat, sliced = tmp_path / "flat", tmp_path / "sliced"
  _run(tmp_path, flat, 1, *flat_args)
  out = _run(tmp_path, sliced, 2, *sliced_args)
  assert logged in out.stdout + out.stderr
  a, b = _losses(flat), _losses(sliced)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0,
                             atol=1e-5)


def test_a_mesh_that_interleaves_the_processes_rows_is_refused(tmp_path):
  """data=2 x dcn_fsdp=2: each process's devices would hold every other pair of batch rows,
  not the contiguous block the pipeline feeds it (rows trained twice, others never): refused
  before training, with the fix."""
  write_corpus(str(tmp_path / "corpus"))
  cmd = [sys.executable, "-m", "launch.local", "--num_processes=2",
         "--devices_per_process=4", "--grace_s=5", "--",
         *_args(tmp_path, tmp_path / "run", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
                "--config.mesh.dcn_fsdp=2")]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode != 0
  assert ("but the input pipeline feeds each process one contiguous block (rows 0..3 here); "
          "split the slices over the data axis (config.mesh.dcn_data)") in out.stdout + out.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


# Run in every process through the launcher: the mesh indices of this process's devices.
_MESH_PROBE = """
import json, sys
import jax, numpy as np
from configs import common
from jaxft.parallel import distributed, sharding
distributed.initialize()
for spec in sys.argv[1:]:
  cfg = common.mesh()
  cfg.update({k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
  try:
    mesh = sharding.make_mesh(cfg)
  except ValueError as e:
    print("PROBE", json.dumps({"spec": spec, "error": str(e)}))
    continue
  mine = [[int(i) for i in ix] for ix, d in np.ndenumerate(mesh.devices)
          if d in jax.local_devices()]
  print("PROBE", json.dumps({"spec": spec, "process": jax.process_index(),
                             "shape": dict(mesh.shape), "indices": mine}))
"""


def test_each_slice_is_its_own_block_of_the_mesh(capfd):
  """With 2 processes as 2 slices, dcn_data=2 gives each process its own half of the data
  axis (fsdp inside it), dcn_fsdp=2 its own half of the fsdp axis; a dcn that does not match
  the 2 slices fails with the fix."""
  specs = ["fsdp=2,dcn_data=2", "data=2,fsdp=-1,dcn_fsdp=2", "dcn_data=4"]
  code = local.launch(["-c", _MESH_PROBE, *specs], 2, module="", devices_per_process=4,
                      grace_s=5, cwd=ROOT)
  out = capfd.readouterr().out
  assert code == 0, out[-4000:]
  probes = [json.loads(line.split("PROBE ", 1)[1]) for line in out.splitlines()
            if "PROBE " in line]
  by = {(p["spec"], p.get("process")): p for p in probes}
  for proc in (0, 1):
    data = by[(specs[0], proc)]
    assert data["shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sorted({i[0] for i in data["indices"]}) == [2 * proc, 2 * proc + 1]
    assert sorted({i[1] for i in data["indices"]}) == [0, 1]
    fsdp = by[(specs[1], proc)]
    assert fsdp["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted({i[1] for i in fsdp["indices"]}) == [2 * proc, 2 * proc + 1]
    assert sorted({i[0] for i in fsdp["indices"]}) == [0, 1]
  error = by[(specs[2], None)]["error"]
  assert "span 4 slices but the 8 devices form 2 slices of processes" in error


def test_a_dead_process_stops_the_others(runs, tmp_path):
  """SIGKILL one of two processes mid-run: the other exits within the heartbeat timeout with
  JAX's error naming the cause, rather than waiting forever in a collective."""
  tmp, _, _ = runs
  workdir = tmp_path / "killed"
  port = local.free_port()
  procs, logs = [], []
  for i in range(2):
    env = {**local.process_env(i, 2, port, 4), "JAXFT_HEARTBEAT_TIMEOUT_S": "5"}
    logs.append(open(tmp_path / f"p{i}.log", "w+"))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jaxft.train",
         *_args(tmp, workdir, "--config.num_steps=100000", "--config.eval_every=100000")],
        cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.exists(workdir / "metrics.jsonl"):
    time.sleep(0.5)
  time.sleep(2)
  assert procs[0].poll() is None and procs[1].poll() is None, "both should still be training"
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    code = procs[0].wait(timeout=60)
  finally:
    for p in procs:
      p.kill()
  assert code != 0 and time.time() - killed_at < 60
  logs[0].seek(0)
  assert "another task died" in logs[0].read()


def test_launcher_reports_the_failed_process(tmp_path, capfd):
  code = local.launch(["-c", "import os, sys; sys.exit(3 if os.environ['JAXFT_PROCESS_ID'] == '1' "
                       "else 0)"], 2, module="", grace_s=1)
  assert code == 3
  assert "process 1 of 2 failed (exit code 3)" in capfd.readouterr().err


def test_initialize_needs_all_three_settings(monkeypatch):
  for name in ("JAXFT_COORDINATOR_ADDRESS", "JAXFT_NUM_PROCESSES", "JAXFT_PROCESS_ID",
               "JAXFT_DISTRIBUTED", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
               "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False  # one process: nothing to join
  with pytest.raises(ValueError, match=r"needs all of --coordinator_address .* --process_id"):
    distributed.initialize(coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
