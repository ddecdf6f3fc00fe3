"""Compile time and per-device memory of the train step: per remat policy with and without
nn.scan over layers, or per mesh factorisation.

    python -m jaxft.bench.memory [--policies none,full,dots,dots_all] [--scan false,true] \
        -- --config configs/gpt2.py:124m --config.batch_size=8 [--config.FIELD=V ...]
    python -m jaxft.bench.memory --meshes 8 -- --config configs/gpt2.py:124m --config.batch_size=8

Each combination is one `python -m jaxft.train ... --compile_only` in its own process (the
train step lowered and compiled exactly as training would, nothing run): lowering and
compilation seconds, the train state (params + optimizer state) per device, XLA's per-device
memory analysis (temporaries = what the backward pass keeps plus scratch; peak = arguments +
outputs - donated + temporaries + code) and the process's peak host memory. `--meshes N`
compares every data x fsdp x tensor factorisation of N devices instead (N fake devices when
the platform is CPU). Combinations run one after another on the same machine, so the ratios
between them are the figures to quote. A combination that fails to compile (e.g. XLA's
out-of-memory for the device, or for a TPU slice with --topology) is reported with its error.
The last line printed is one JSON list.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_POLICIES = None
_SCAN = None
_MESHES = None


def _define_flags():
  global _POLICIES, _SCAN, _MESHES
  _POLICIES = flags.DEFINE_list("policies", ["none", "full", "dots", "dots_all"],
                                "config.model.remat values to compare")
  _SCAN = flags.DEFINE_list("scan", ["false", "true"], "config.model.scan_layers values")
  _MESHES = flags.DEFINE_integer("meshes", 0, "instead: every data x fsdp x tensor "
                                 "factorisation of this many devices")


def remat_and_scan(policies: list[str], scans: list[str]) -> list[dict]:
  return [{"remat": remat, "scan_layers": scan.lower() in ("true", "1", "yes")}
          for scan in scans for remat in policies]


def factorisations(n: int) -> list[dict]:
  return [{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": n // (d * f)}
          for d, f in itertools.product(range(1, n + 1), repeat=2) if n % (d * f) == 0]


def measure(train_args: list[str], settings: dict, env: dict | None = None) -> dict:
  """One --compile_only run in a child process with `settings` ({"remat": "full"} ->
  --config.model.remat=full; dotted keys are config paths): its JSON report, plus the child's
  peak resident memory (wait4's rusage: this child's alone)."""
  overrides = [f"--config.{k if '.' in k else 'model.' + k}={v}" for k, v in settings.items()]
  cmd = [sys.executable, "-m", "jaxft.train", *train_args, "--compile_only", *overrides]
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    if proc.returncode:  # e.g. XLA's compile-time out-of-memory for that device: a result
      lines = err.read().strip().splitlines() or [f"exit code {proc.returncode}"]
      errors = [x for x in lines if "Error: " in x] or lines  # the exception's own line
      report = {"error": errors[-1].strip()[:300]}
    else:
      report = json.loads(out.read().strip().splitlines()[-1])
  # Linux reports ru_maxrss in KiB.
  return {**settings, **report, "wall_s": wall_s, "host_peak_rss": usage.ru_maxrss * 1024}


def table(rows: list[dict], keys: list[str]) -> str:
  """Rows as text; ratios against the first row that compiled."""
  gib = 2.0 ** 30
  rows = [r if "error" in r else {**r, "total_s": r["lower_s"] + r["compile_s"]} for r in rows]
  base = next((r for r in rows if "error" not in r), {})

  def ratio(r, field):
    return r[field] / base[field] if base.get(field) else float("nan")

  label = lambda r: " ".join(f"{str(r[k]).lower():<9}" for k in keys)  # noqa: E731
  lines = [" ".join(f"{k.split('.')[-1]:<9}" for k in keys)
           + f" {'compile s':>9} {'x base':>6} {'state GiB':>9} {'x base':>6} {'temp GiB':>9}"
           f" {'x base':>6} {'peak GiB':>9} {'host RSS GiB':>12}"]
  for r in rows:
    if "error" in r:
      lines.append(f"{label(r)} failed: {r['error']}")
      continue
    lines.append(
        f"{label(r)} {r['total_s']:>9.1f} {ratio(r, 'total_s'):>6.2f} "
        f"{r['train_state'] / gib:>9.3f} {ratio(r, 'train_state'):>6.2f} "
        f"{r.get('temp', 0) / gib:>9.3f} {ratio(r, 'temp'):>6.2f} "
        f"{r.get('peak_estimate', 0) / gib:>9.3f} {r['host_peak_rss'] / gib:>12.2f}")
  return "\n".join(lines)


def main(argv):
  train_args = argv[1:]
  if not any(a.startswith("--config") for a in train_args):
    raise app.UsageError("give the training arguments after --, e.g. -- --config "
                         "configs/gpt2.py:124m --config.batch_size=8")
  env = None
  if _MESHES.value:
    combos = factorisations(_MESHES.value)
    # On CPU the children get that many fake devices (only the CPU platform reads the flag).
    flag = f"--xla_force_host_platform_device_count={_MESHES.value}"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
  else:
    combos = remat_and_scan(_POLICIES.value, _SCAN.value)
  keys = list(combos[0])
  rows = []
  for settings in combos:
    rows.append(measure(train_args, settings, env))
    print(table(rows, keys).splitlines()[-1], flush=True)
  print(table(rows, keys))
  print(json.dumps(rows))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
