"""Compile time and memory of the train step per remat policy, with and without nn.scan.

    python -m jaxft.bench_memory [--policies none,full,dots,dots_all] [--scan false,true] \
        -- --config configs/gpt2.py:124m --config.batch_size=8 [--config.FIELD=V ...]

Each combination is one `python -m jaxft.train ... --compile_only` in its own process (the
train step lowered and compiled exactly as training would, nothing run): lowering and
compilation seconds, XLA's per-device memory analysis (temporaries = what the backward pass
keeps plus scratch; peak = arguments + outputs - donated + temporaries + code) and the
process's peak host memory. Combinations run one after another on the same machine, so the
ratios between them are the figures to quote. A combination that fails to compile (e.g. XLA's
out-of-memory for the device, or with --topology for a TPU slice) is reported with its error.
The last line printed is one JSON list.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_POLICIES = None
_SCAN = None


def _define_flags():
  global _POLICIES, _SCAN
  _POLICIES = flags.DEFINE_list("policies", ["none", "full", "dots", "dots_all"],
                                "config.model.remat values to compare")
  _SCAN = flags.DEFINE_list("scan", ["false", "true"], "config.model.scan_layers values")


def measure(train_args: list[str], remat: str, scan: bool) -> dict:
  """One --compile_only run in a child process: its JSON report, plus the child's peak
  resident memory (from wait4's rusage: this child's alone)."""
  cmd = [sys.executable, "-m", "jaxft.train", *train_args, "--compile_only",
         f"--config.model.remat={remat}", f"--config.model.scan_layers={scan}"]
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
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
  report.update(remat=remat, scan_layers=scan, wall_s=wall_s,
                host_peak_rss=usage.ru_maxrss * 1024)
  return report


def table(rows: list[dict]) -> str:
  gib = 2.0 ** 30
  base = next((r for r in rows if "error" not in r), {"lower_s": 1, "compile_s": 0, "temp": 1})
  lines = [f"{'remat':<9} {'scan':<5} {'compile s':>9} {'x base':>7} {'temp GiB':>9} "
           f"{'x base':>7} {'peak GiB':>9} {'host RSS GiB':>12}"]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['remat']:<9} {str(r['scan_layers']).lower():<5} failed: {r['error']}")
      continue
    compile_s = r["lower_s"] + r["compile_s"]
    base_s = base["lower_s"] + base["compile_s"]
    lines.append(
        f"{r['remat']:<9} {str(r['scan_layers']).lower():<5} {compile_s:>9.1f} "
        f"{compile_s / base_s:>7.2f} {r.get('temp', 0) / gib:>9.3f} "
        f"{r.get('temp', 0) / max(base.get('temp', 1), 1):>7.2f} "
        f"{r.get('peak_estimate', 0) / gib:>9.3f} {r.get('host_peak_rss', 0) / gib:>12.2f}")
  return "\n".join(lines)


def main(argv):
  train_args = argv[1:]
  if not any(a.startswith("--config") for a in train_args):
    raise app.UsageError("give the training arguments after --, e.g. -- --config "
                         "configs/gpt2.py:124m --config.batch_size=8")
  rows = []
  for scan in _SCAN.value:
    for remat in _POLICIES.value:
      rows.append(measure(train_args, remat, scan.lower() in ("true", "1", "yes")))
      print(table([rows[0], rows[-1]]).splitlines()[-1], flush=True)
  print(table(rows))
  print(json.dumps(rows))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
