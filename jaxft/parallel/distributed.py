"""Multi-process JAX: joining the processes of a run, and reading arrays back to the host.

Every process of a multi-host run executes the same program on its own devices; they meet at a
coordinator (process 0's host:port). `initialize` finds out how to join, in this order:

1. explicit settings: --coordinator_address / --num_processes / --process_id of jaxft.train,
   or the environment variables JAXFT_COORDINATOR_ADDRESS, JAXFT_NUM_PROCESSES,
   JAXFT_PROCESS_ID (what `python -m launch.local` sets);
2. a cluster JAX detects by itself: a Cloud TPU pod slice (JAX reads the TPU VM metadata;
   launch/tpu_pod.py sets JAXFT_DISTRIBUTED=auto to ask for it, and on GKE
   TPU_WORKER_HOSTNAMES lists the hosts), SLURM (SLURM_NTASKS > 1; one process per GPU),
   Open MPI;
3. otherwise one process, nothing to do.

Failures are bounded: joining waits at most JAXFT_INIT_TIMEOUT_S (300 s), and a process that
stops sending heartbeats for JAXFT_HEARTBEAT_TIMEOUT_S (60 s) makes the coordination service
stop every other process with an error naming the missing task, instead of leaving them blocked
in a collective. On CPU the processes run their collectives over gloo.

Ports: process 0 serves the coordinator (gRPC) on the coordinator address's port, and every
process's gloo CPU collectives listen on a port of their own. With a loopback coordinator address
(127.x.x.x, ::1, localhost: what launch.local gives) both listen on that loopback address only;
otherwise JAX's defaults hold (the coordinator on all interfaces, gloo on the address this host's
name resolves to), since the other hosts must reach them. JAXFT_COORDINATOR_BIND_ADDRESS
(host:port; JAX's own JAX_COORDINATOR_BIND_ADDRESS too) and JAXFT_CPU_COLLECTIVES_HOST (a host
name or address of this machine) override the two.
"""

import contextlib
import ipaddress
import logging
import os

import jax
import jax.extend.backend
import numpy as np
from jax._src import distributed as jax_distributed  # private: see _gloo_listens_on
from jax._src import xla_bridge
from jax._src.lib import _jax
from jax.experimental import multihost_utils

log = logging.getLogger("jaxft")

_ENV = ("JAXFT_COORDINATOR_ADDRESS", "JAXFT_NUM_PROCESSES", "JAXFT_PROCESS_ID")


def _cluster_detected() -> str | None:
  if os.environ.get("JAXFT_DISTRIBUTED", "") == "auto":  # set by launch/tpu_pod.py run
    return "JAXFT_DISTRIBUTED=auto"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "Cloud TPU pod"
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  return None


def loopback_host(address: str) -> str | None:
  """The host of `address` (host:port, [v6]:port) if it is a loopback one, else None."""
  host = address.rsplit(":", 1)[0].strip("[]")
  if host == "localhost":
    return host
  try:
    return host if ipaddress.ip_address(host).is_loopback else None
  except ValueError:  # a host name: it may well name another machine
    return None


def _gloo_listens_on(hostname: str) -> None:
  """Makes the CPU backend's gloo collectives listen on `hostname`: JAX builds them without a
  hostname, and gloo then binds the address that this machine's name resolves to, which is
  usually a network interface. Re-registering the "cpu" factory is allowed until the backend is
  first used, and jax.distributed.initialize must come before that anyway."""
  # The two hooks are private: make_cpu_client(collectives=) and jaxlib's gloo constructor (whose
  # hostname argument the default path leaves unset); tests/test_ports.py checks they still work.
  def make_cpu_client():
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=jax_distributed.global_state.client, hostname=hostname)
    return xla_bridge.make_cpu_client(collectives=collectives)

  jax.extend.backend.register_backend_factory("cpu", make_cpu_client, priority=0,
                                              fail_quietly=False)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the run's processes (see the module docstring); True if there is more than one."""
  coordinator_address = coordinator_address or os.environ.get(_ENV[0]) or None
  if num_processes is None and os.environ.get(_ENV[1]):
    num_processes = int(os.environ[_ENV[1]])
  if process_id is None and os.environ.get(_ENV[2]):
    process_id = int(os.environ[_ENV[2]])
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("a multi-process run needs all of --coordinator_address (host:port of "
                     "process 0), --num_processes and --process_id (or the JAXFT_* variables); "
                     f"got coordinator_address={coordinator_address!r}, "
                     f"num_processes={num_processes}, process_id={process_id}")
  cluster = _cluster_detected()
  if coordinator_address is None and cluster is None:
    return False
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                     f"{num_processes})")
  # Cross-process collectives of the CPU backend (no effect on GPU/TPU ones).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(initialization_timeout=int(os.environ.get("JAXFT_INIT_TIMEOUT_S", 300)),
                  heartbeat_timeout_seconds=int(os.environ.get("JAXFT_HEARTBEAT_TIMEOUT_S", 60)))
  # One machine: nothing outside it has to reach the ports, so listen on loopback only (JAX
  # would bind the coordinator to [::] and gloo to the host name's address).
  loopback = loopback_host(coordinator_address) if coordinator_address else None
  bind = os.environ.get("JAXFT_COORDINATOR_BIND_ADDRESS") or None
  if bind is None and loopback and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    bind = coordinator_address
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               coordinator_bind_address=bind, **timeouts)
  else:  # JAX reads the cluster's own variables
    jax.distributed.initialize(coordinator_bind_address=bind, **timeouts)
  gloo_host = os.environ.get("JAXFT_CPU_COLLECTIVES_HOST") or loopback
  if gloo_host:  # after a successful join: the factory needs the distributed client
    _gloo_listens_on(gloo_host)
  log.info("process %d of %d (%s) with %d local devices, %d in all", jax.process_index(),
           jax.process_count(), cluster or f"coordinator {coordinator_address}",
           jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def to_host(tree):
  """Every leaf as a numpy array, whatever its sharding: a fully replicated array from a local
  copy, an array spread over several processes by an all-gather (a collective: every process
  must call this at the same point)."""
  def leaf(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(leaf, tree)


def is_primary() -> bool:
  """Process 0: the one that writes logs, reports and metadata files."""
  return jax.process_index() == 0


@contextlib.contextmanager
def primary_first(name: str):
  """Process 0 runs the block first (e.g. builds a dataset into a shared directory), the others
  after it: they wait at a barrier that process 0 reaches when its block is done."""
  if jax.process_count() == 1:
    yield
    return
  if not is_primary():
    multihost_utils.sync_global_devices(f"jaxft:{name}")
  yield
  if is_primary():
    multihost_utils.sync_global_devices(f"jaxft:{name}")
