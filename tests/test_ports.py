"""A 2-process run on one machine listens on loopback only: the coordinator's gRPC port and the
gloo CPU collectives' ports, read from the launched processes' sockets in /proc."""

import ipaddress
import os
import struct
import subprocess
import sys
import time

import pytest

from launch import local
from tests.helpers import ROOT

# Run in every process through the launcher: join, do one cross-process collective (so gloo has
# opened its listeners), leave its pid in a file (its output interleaves with gloo's), then hold
# the sockets open until the test says done.
_PROBE = """
import os, sys, time
import jax, numpy as np
from jax.experimental import multihost_utils
from jaxft.parallel import distributed
distributed.initialize()
total = multihost_utils.process_allgather(np.array([jax.process_index() + 1])).sum()
assert total == 3, total
ready = os.path.join(sys.argv[1], f"ready{jax.process_index()}")
with open(ready + ".tmp", "w") as f:
  f.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
deadline = time.time() + 120
while not os.path.exists(os.path.join(sys.argv[1], "done")) and time.time() < deadline:
  time.sleep(0.1)
"""

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def _address(hex_ip: str) -> str:
  """/proc/net/tcp* print an address as 32-bit words in host byte order; an IPv4 address that an
  IPv6 socket binds (::ffff:127.0.0.1, as gRPC does) comes back as the IPv4 one."""
  raw = bytes.fromhex(hex_ip)
  words = struct.unpack(f"={len(raw) // 4}I", raw)
  ip = ipaddress.ip_address(b"".join(struct.pack("!I", w) for w in words))
  return str(getattr(ip, "ipv4_mapped", None) or ip)


def listening(pid: int) -> list[tuple[str, int]]:
  """(address, port) of every TCP socket in LISTEN state that process `pid` holds open."""
  inodes = set()
  fd_dir = f"/proc/{pid}/fd"
  for fd in os.listdir(fd_dir):
    try:
      target = os.readlink(os.path.join(fd_dir, fd))
    except FileNotFoundError:  # closed between listdir and readlink
      continue
    if target.startswith("socket:["):
      inodes.add(target[len("socket:["):-1])
  found = []
  for table in ("tcp", "tcp6"):
    with open(f"/proc/{pid}/net/{table}") as f:
      next(f)  # header
      for line in f:
        cols = line.split()
        bound, state, inode = cols[1], cols[3], cols[9]
        if state == _LISTEN and inode in inodes:
          ip, port = bound.split(":")
          found.append((_address(ip), int(port, 16)))
  return found


def _run_and_list(tmp_path, host: str, port: int, **env_vars) -> list[list[tuple[str, int]]]:
  """Starts the probe under python -m launch.local; the listeners of the launcher and of each
  of the 2 processes, read once both have done their collective."""
  cmd = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=2",
         "--module=", "--grace_s=5", f"--host={host}", f"--port={port}", "--", "-c", _PROBE,
         str(tmp_path)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_vars}
  for name in ("JAXFT_COORDINATOR_BIND_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS",
               "JAXFT_CPU_COLLECTIVES_HOST"):
    if name not in env_vars:
      env.pop(name, None)
  with open(tmp_path / "launcher.log", "w+") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    try:
      deadline = time.time() + 240
      while not all(r.exists() for r in ready) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
      assert all(r.exists() for r in ready), (tmp_path / "launcher.log").read_text()[-4000:]
      sockets = [listening(pid) for pid in [proc.pid, *(int(r.read_text()) for r in ready)]]
    finally:
      (tmp_path / "done").touch()
      code = proc.wait(timeout=120)
  assert code == 0, (tmp_path / "launcher.log").read_text()[-4000:]
  return sockets


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_local_run_listens_on_its_loopback_address_only(tmp_path, host):
  """The coordinator (process 0) and both processes' gloo listeners are on the launcher's
  loopback address, not [::] (JAX's coordinator default) nor the address of this machine's
  name (gloo's default). Where that name resolves to 127.0.0.1, only the ::1 case tells gloo's
  default apart from the fix."""
  port = local.free_port(host)
  launcher, first, second = _run_and_list(tmp_path, host, port)
  assert launcher == []
  assert (host, port) in first, first
  for listeners in (first, second):  # gloo: a port of its own in every process
    assert [p for _, p in listeners if p != port], listeners
    assert all(address == host for address, _ in listeners), listeners


def test_the_listen_addresses_can_be_overridden(tmp_path):
  """JAXFT_COORDINATOR_BIND_ADDRESS and JAXFT_CPU_COLLECTIVES_HOST (for a host with several
  interfaces) win over the loopback default; [::] (all interfaces, JAX's own default) is what
  process 0 of a multi-host run binds, reached here through 127.0.0.1."""
  port = local.free_port()
  _, first, second = _run_and_list(tmp_path, "127.0.0.1", port,
                                   JAXFT_COORDINATOR_BIND_ADDRESS=f"[::]:{port}",
                                   JAXFT_CPU_COLLECTIVES_HOST="127.0.0.3")
  assert ("::", port) in first, first
  assert sorted(a for a, p in first if p != port) == ["127.0.0.3"], first
  assert [a for a, _ in second] == ["127.0.0.3"], second
