"""N processes of one jaxft run on this machine, as a multi-host run would have them.

    python -m launch.local --num_processes 2 --devices_per_process 4 -- \
        --config configs/gpt2.py:tiny --workdir runs/two

Starts `python -m jaxft.train <args>` (or --module) N times with the coordinator on
127.0.0.1 (--host: another loopback address) and JAXFT_NUM_PROCESSES / JAXFT_PROCESS_ID set, so
each process joins through jax.distributed exactly as on a pod; with --devices_per_process each
one sees that many CPU devices. Output lines are prefixed with the process index. If a process
fails, the others get --grace_s seconds to notice (their coordination service stops them) and
are then terminated; the launcher exits with the failing process's code and says which one
failed.

Nothing listens beyond loopback: the coordinator binds the loopback address (through
JAX_COORDINATOR_BIND_ADDRESS, which jax.distributed reads itself, unless already set), and
jaxft's distributed.initialize puts the gloo CPU collectives there too (docs/scaling.md, "Ports
and interfaces").
"""

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags


def _loopback(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
  try:
    ip = ipaddress.ip_address(host)
  except ValueError:  # a name: what it resolves to is not ours to promise
    ip = None
  if ip is None or not ip.is_loopback:
    raise ValueError(f"--host={host} must be a loopback address (127.0.0.1, ::1, any "
                     "127.x.x.x): these processes all run on this machine")
  return ip


def free_port(host: str = "127.0.0.1") -> int:
  family = socket.AF_INET6 if _loopback(host).version == 6 else socket.AF_INET
  with socket.socket(family) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(index: int, num: int, port: int, devices: int | None,
                host: str = "127.0.0.1") -> dict[str, str]:
  address = f"[{host}]:{port}" if _loopback(host).version == 6 else f"{host}:{port}"
  env = {**os.environ, "JAXFT_COORDINATOR_ADDRESS": address,
         "JAXFT_NUM_PROCESSES": str(num), "JAXFT_PROCESS_ID": str(index),
         "PYTHONUNBUFFERED": "1"}
  # For programs that call jax.distributed.initialize themselves: it binds [::]:port otherwise.
  env.setdefault("JAX_COORDINATOR_BIND_ADDRESS", address)
  if devices:
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  return env


def _relay(index: int, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[{index}] {line}")
    out.flush()


def launch(args: list[str], num_processes: int, *, module: str = "jaxft.train",
           devices_per_process: int | None = None, port: int = 0, grace_s: float = 30.0,
           cwd: str | None = None, host: str = "127.0.0.1") -> int:
  """Runs the processes to the end; returns 0, or the exit code of the first that failed."""
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  port = port or free_port(host)
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    p = subprocess.Popen(cmd, cwd=cwd,
                         env=process_env(i, num_processes, port, devices_per_process, host),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_relay, args=(i, p.stdout, sys.stdout), daemon=True).start()
    procs.append(p)
  failed, deadline = None, None
  while any(p.poll() is None for p in procs):
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      if failed is not None:
        deadline = time.monotonic() + grace_s
        print(f"launch.local: process {failed} exited with code {procs[failed].returncode}"
              f"; the others have {grace_s:.0f} s to stop", file=sys.stderr, flush=True)
    elif time.monotonic() > deadline:
      for i, p in enumerate(procs):
        if p.poll() is None:
          print(f"launch.local: terminating process {i}", file=sys.stderr, flush=True)
          p.send_signal(signal.SIGTERM)
      for p in procs:  # 10 s to exit on SIGTERM, then SIGKILL
        try:
          p.wait(timeout=10)
        except subprocess.TimeoutExpired:
          p.kill()
    time.sleep(0.1)
  if failed is None:
    failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
  if failed is None:
    return 0
  code = procs[failed].returncode
  print(f"launch.local: process {failed} of {num_processes} failed (exit code {code})",
        file=sys.stderr, flush=True)
  return code if code > 0 else 1


def _define_flags() -> None:
  """Only when run as a program: tests import this module next to jaxft.train's flags."""
  flags.DEFINE_integer("num_processes", 2, "processes to start")
  flags.DEFINE_integer("devices_per_process", None, "CPU devices each process sees "
                       "(JAX_NUM_CPU_DEVICES); default: the platform's own")
  flags.DEFINE_string("module", "jaxft.train", "python -m module every process runs; '' = the "
                      "arguments are the whole python command line")
  flags.DEFINE_string("host", "127.0.0.1", "loopback address the coordinator and the CPU "
                      "collectives listen on (127.0.0.1, ::1, any 127.x.x.x)")
  flags.DEFINE_integer("port", 0, "coordinator port on --host; 0 = a free one")
  flags.DEFINE_float("grace_s", 30.0, "after a failure, seconds before the others are "
                     "terminated")


def main(argv):
  args = argv[1:]
  if args and args[0] == "--":
    args = args[1:]
  f = flags.FLAGS
  sys.exit(launch(args, f.num_processes, module=f.module, devices_per_process=f.devices_per_process,
                  port=f.port, grace_s=f.grace_s, host=f.host))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
