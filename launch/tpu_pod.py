r"""Cloud TPU VM pod launcher: a thin wrapper around `gcloud compute tpus tpu-vm`.

    python -m launch.tpu_pod create NAME --zone=us-central2-b --accelerator_type=v4-32 [--spot]
    python -m launch.tpu_pod setup  NAME --zone=us-central2-b [--repo=URL [--ref=BRANCH]]
    python -m launch.tpu_pod run    NAME --zone=us-central2-b -- \
        python -m jaxft.train --config configs/gpt2.py:124m --workdir /mnt/shared/runs/124m
    python -m launch.tpu_pod logs   NAME --zone=us-central2-b [--follow]
    python -m launch.tpu_pod stop   NAME --zone=us-central2-b
    python -m launch.tpu_pod delete NAME --zone=us-central2-b

`--dry-run` prints every command, shell-quoted, one per line, and runs nothing.

A pod slice is several TPU VMs ("workers", one per host) that must all run the same program at
the same time. `setup` installs this checkout (or `git clone --repo`) with `pip install -e .`
and `jax[tpu]` into a Python >= 3.11 venv on every worker; `run` starts the same command on all
of them with `gcloud ... ssh --worker=all`, in the background of each worker (it survives a
dropped connection), streams the output with a `[worker N]` prefix and writes each worker's
lines to LOG_DIR/worker-N.log. There, `jax.distributed.initialize()` needs no arguments: JAX
reads the coordinator (worker 0), the process count and each host's process id from the TPU VM
metadata. The workdir must be a directory every worker reaches (a shared disk: Cloud Storage
FUSE, Filestore; jaxft writes it with plain file I/O, so not a gs:// URL); the
same `run` command resumes from its newest checkpoint, which is how a preempted --spot slice
goes on: `create` it again (same name), `setup`, `run`.
"""

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

from launch.tpu_scripts import (
  REMOTE_TARBALL,
  STOP_SCRIPT,
  follow_script,
  join,
  local_tarball,
  run_script,
  setup_script,
)
from launch.tpu_slices import EXAMPLES, UsageError, parse_accelerator_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER_LINE = re.compile(r"^\[worker (\d+)\] ?(.*)$", re.S)


# -- commands -------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
  """One command: argv for a subprocess, or `call` to do it in this process (printed as argv)."""
  argv: list[str]
  call: object = None  # a function of no arguments
  stream: bool = False  # echo the output as it comes
  keep: bool = False  # and demultiplex its `[worker N]` lines into LOG_DIR/worker-N.log


def _gcloud(args, verb: str, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def _ssh(args, script: list[str], worker: str = "all") -> list[str]:
  """`script`: shell statements, each on one line; joined with '; ' so that --dry-run prints
  every command on one line."""
  return _gcloud(args, "ssh", args.name) + [f"--worker={worker}", "--command", join(script)]


def steps_for(args) -> list[Step]:
  """The commands a subcommand runs, in order."""
  if args.command == "create":
    s = args.slice
    cmd = _gcloud(args, "create", args.name) + [f"--accelerator-type={s.accelerator_type}",
                                                f"--version={args.runtime_version}"]
    if args.spot:
      cmd.append("--spot")
    if args.preemptible:
      cmd.append("--preemptible")
    return [Step(cmd)]
  if args.command == "setup":
    steps = []
    if not args.repo:
      tarball = local_tarball(args.name)
      steps += [Step(["python", "-m", "launch.tpu_pod", "pack", tarball],
                     call=lambda: pack(tarball)),
                Step(_gcloud(args, "scp", tarball, f"{args.name}:{REMOTE_TARBALL}")
                     + ["--worker=all"])]
    return steps + [Step(_ssh(args, setup_script(args)))]
  if args.command == "run":
    return [Step(_ssh(args, run_script(args.remote_command, args.detach)),
                 stream=not args.detach, keep=True)]
  if args.command in ("logs", "collect"):
    if args.follow:
      return [Step(_ssh(args, follow_script(args.lines)), stream=True)]
    return [Step(_gcloud(args, "scp", f"{args.name}:jaxft-logs/worker-{w}.log",
                         os.path.join(args.log_dir, f"worker-{w}.log")) + [f"--worker={w}"])
            for w in range(args.workers)]
  if args.command == "stop":
    steps = [Step(_ssh(args, STOP_SCRIPT))]
    if args.vm:
      steps.append(Step(_gcloud(args, "stop", args.name)))
    return steps
  if args.command == "delete":
    return [Step(_gcloud(args, "delete", args.name) + (["--quiet"] if args.yes else []))]
  raise UsageError(f"unknown command {args.command!r}")


# -- running --------------------------------------------------------------------------------

def pack(out: str, root: str = ROOT) -> int:
  """This checkout's files (tracked and untracked, not git-ignored: no runs/, no venv) -> a
  .tar.gz; returns the number of files."""
  try:
    listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "-co", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    files = sorted(f for f in listed if f and os.path.isfile(os.path.join(root, f)))
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: skip the usual clutter
    skip = {".git", ".venv", "venv", "runs", "build", "__pycache__", ".pytest_cache"}
    files = []
    for d, dirs, names in os.walk(root):
      dirs[:] = sorted(x for x in dirs if x not in skip and not x.endswith(".egg-info"))
      files += sorted(os.path.relpath(os.path.join(d, n), root) for n in names)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with tarfile.open(out, "w:gz") as tar:
    for f in files:
      tar.add(os.path.join(root, f), arcname=f, recursive=False)
  print(f"packed {len(files)} files of {root} into {out} "
        f"({os.path.getsize(out) / 1e6:.1f} MB)", file=sys.stderr)
  return len(files)


def _stream(argv: list[str], log_dir: str | None) -> int:
  """Runs argv; echoes its output and, with a log_dir, writes each `[worker N] ...` line to
  log_dir/worker-N.log (anything else to log_dir/gcloud.log)."""
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  files = {}

  def sink(key: str):
    if key not in files:
      files[key] = open(os.path.join(log_dir, f"{key}.log"), "w", encoding="utf-8")
    return files[key]

  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1)
  try:
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      if not log_dir:
        continue
      m = WORKER_LINE.match(line)
      f = sink(f"worker-{m.group(1)}") if m else sink("gcloud")
      f.write(m.group(2) if m else line)
      f.flush()
    return proc.wait()
  except KeyboardInterrupt:
    proc.terminate()
    print("\ndetached: the run goes on on the workers; `logs --follow` shows it again, `stop` "
          "ends it", file=sys.stderr)
    return 130
  finally:
    for f in files.values():
      f.close()


def execute(steps: list[Step], args) -> int:
  for step in steps:
    if args.dry_run:
      print(shlex.join(step.argv))
      continue
    if step.call is not None:
      step.call()
      continue
    rc = (_stream(step.argv, args.log_dir if step.keep else None) if step.stream
          else subprocess.run(step.argv, check=False).returncode)
    if rc:
      print(f"error: exit status {rc} from: {shlex.join(step.argv[:6])} ...", file=sys.stderr)
      return rc
  return 0


def count_workers(args) -> int:
  """Workers of an existing TPU: from --accelerator_type, else from `gcloud ... describe`."""
  if args.slice is not None:
    return args.slice.workers
  if args.dry_run:
    raise UsageError("--dry-run cannot ask the TPU how many workers it has: add "
                     "--accelerator_type (e.g. --accelerator_type=v4-32)")
  described = subprocess.run(_gcloud(args, "describe", args.name) + ["--format=json"],
                             capture_output=True, text=True)
  if described.returncode:
    raise UsageError(f"could not ask TPU {args.name!r} for its workers "
                     f"({described.stderr.strip()}); give --accelerator_type (e.g. v4-32)")
  node = json.loads(described.stdout)
  return len(node.get("networkEndpoints") or []) or parse_accelerator_type(
      node["acceleratorType"]).workers


# -- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU name")
  common.add_argument("--zone", help="the TPU's zone, e.g. us-central2-b (v4), us-west4-a (v5e)")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  common.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the commands, shell-quoted, one per line; run nothing")
  common.add_argument("--log_dir", "--log-dir", dest="log_dir",
                      help="local directory for the workers' logs (default runs/tpu/NAME)")
  accel = argparse.ArgumentParser(add_help=False)
  accel.add_argument("--accelerator_type", "--accelerator-type", dest="accelerator_type",
                     help=f"slice type: {EXAMPLES}")

  p = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("create", parents=[common, accel], help="create the TPU VM slice")
  c.add_argument("--runtime_version", "--runtime-version", "--version", dest="runtime_version",
                 help="TPU software version (default: the generation's: tpu-ubuntu2204-base for "
                      "v2-v4, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e, "
                      "v2-alpha-tpuv6e for v6e)")
  kind = c.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true",
                    help="Spot VMs: much cheaper, may be preempted at any time")
  kind.add_argument("--preemptible", action="store_true",
                    help="preemptible VMs (the older form of --spot; at most 24 h)")

  s = sub.add_parser("setup", parents=[common], help="install jaxft + jax[tpu] on every worker")
  s.add_argument("--repo", help="git URL to clone on every worker instead of copying this "
                                "checkout")
  s.add_argument("--ref", default="HEAD", help="branch, tag or commit of --repo (default: its "
                                               "default branch)")
  s.add_argument("--python", default="3.12", help="Python version of the workers' venv (>= 3.11)")
  s.add_argument("--jax_spec", "--jax-spec", dest="jax_spec", default="jax[tpu]",
                 help="pip requirement that brings JAX's TPU support (default jax[tpu])")

  r = sub.add_parser("run", parents=[common],
                     help="run the command after -- on every worker, streaming the output",
                     usage="python -m launch.tpu_pod run NAME --zone=ZONE [--detach] -- "
                           "COMMAND [ARG ...]")
  r.add_argument("--detach", action="store_true",
                 help="start the run and return; `logs --follow` shows it")

  for verb in ("logs", "collect"):
    g = sub.add_parser(verb, parents=[common, accel],
                       help="copy every worker's log to LOG_DIR/worker-N.log (--follow: stream)")
    g.add_argument("--follow", action="store_true", help="stream the logs of all workers")
    g.add_argument("--lines", type=int, default=20, help="with --follow: lines of history shown")

  t = sub.add_parser("stop", parents=[common], help="stop the run on every worker")
  t.add_argument("--vm", action="store_true",
                 help="then also stop the TPU VM (gcloud ... stop): single-host TPUs only; "
                      "a pod slice cannot be stopped, only deleted")
  d = sub.add_parser("delete", parents=[common], help="delete the TPU (its disks go with it)")
  d.add_argument("--yes", action="store_true", help="do not ask for confirmation (--quiet)")
  k = sub.add_parser("pack", help="pack this checkout into a .tar.gz (what setup copies)")
  k.add_argument("out", help="the .tar.gz to write")
  return p


def parse_args(argv: list[str]) -> argparse.Namespace:
  argv = list(argv)
  remote = []
  if "--" in argv:
    i = argv.index("--")
    argv, remote = argv[:i], argv[i + 1:]
  args = _parser().parse_args(argv)
  if args.command == "pack":
    return args
  args.remote_command = remote
  if remote and args.command != "run":
    raise UsageError(f"`{args.command}` takes no command after --; only `run` does")
  if not args.zone:
    raise UsageError(f"--zone is required: the zone of TPU {args.name!r} (e.g. "
                     "--zone=us-central2-b for v4, --zone=us-west4-a for v5e; "
                     "`gcloud compute tpus locations list` lists them)")
  args.slice = None
  if getattr(args, "accelerator_type", None):
    args.slice = parse_accelerator_type(args.accelerator_type)
  if args.command == "create":
    if args.slice is None:
      raise UsageError(f"--accelerator_type is required to create a TPU: one of {EXAMPLES}")
    args.runtime_version = args.runtime_version or args.slice.generation.runtime
  if args.command == "run" and not remote:
    raise UsageError("give the command to run on every worker after --, e.g. run NAME "
                     "--zone=ZONE -- python -m jaxft.train --config configs/gpt2.py:124m "
                     "--workdir /mnt/shared/runs/124m")
  args.log_dir = args.log_dir or os.path.join("runs", "tpu", args.name)
  return args


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse_args(argv)
    if args.command == "pack":
      pack(args.out)
      return 0
    if not args.dry_run and shutil.which("gcloud") is None:
      raise UsageError("gcloud is not on PATH: install the Google Cloud CLI "
                       "(https://cloud.google.com/sdk/docs/install) and `gcloud auth login`; "
                       "--dry-run prints the commands without it")
    if args.slice is not None:
      print(f"# {args.slice.describe()}", file=sys.stderr)
    if args.command == "create":
      print(f"# runtime version {args.runtime_version}", file=sys.stderr)
    if args.command in ("logs", "collect") and not args.follow:
      args.workers = count_workers(args)
      if not args.dry_run:
        os.makedirs(args.log_dir, exist_ok=True)
    rc = execute(steps_for(args), args)
    if not args.dry_run and rc == 0 and args.command in ("logs", "collect") and not args.follow:
      print(f"logs of {args.workers} workers in {args.log_dir}", file=sys.stderr)
    return rc
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
