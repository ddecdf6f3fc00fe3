"""`jaxft.train --compile_only`: lower and compile the train step for the configured mesh (or a
TPU topology this host cannot run on) and report its per-device memory, without initialising a
parameter or running a step."""

import json
import logging
import math

import jax
import ml_collections

from jaxft import tasks
from jaxft.parallel import aot, distributed, sharding
from jaxft.run import distill, loader, optim, steps
from jaxft.run import state as state_lib
from jaxft.training.setup import check_vocab, make_mesh, num_steps

log = logging.getLogger("jaxft")


def compile_only(config: ml_collections.ConfigDict, topology: str = "") -> dict:
  """Compiles on this host's devices or on a TPU `topology` ("v5e-16", "v4-32", "v5e:4x4";
  needs libtpu); prints and returns the per-device memory analysis."""
  config = loader.resolve(config)
  if distill.settings(config) or config.get("continual", {}).get("ewc_file"):
    # The teacher (or EMA) and EWC's arrays are opened from files a compile-only host may lack.
    log.warning("--compile_only compiles the student's own step: the distillation teacher, its "
                "logits and EWC's Fisher are not in the memory figures (config.distill, "
                "config.continual.ewc_file)")
  devices = None
  if topology:  # one slice per config.mesh.dcn_* product: multi-slice compiles too
    slices = math.prod(sharding.dcn_shape(config.mesh))
    devices = aot.topology_devices(topology, slices)
  mesh = make_mesh(config, devices)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  with distributed.primary_first("data"):
    task = tasks.make_task(config)
    check_vocab(config)
    batch = next(task.train_iterator(config.data.shuffle_seed, **proc))
  tx, schedule = optim.make_optimizer(config.optim, num_steps(config, task), task.peft)
  lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
  shardings = state_lib.state_shardings(lay, tx, mesh)
  train_step, _, batch_sh, frozen_sh = steps.jit_steps(task, tx, schedule, config, lay,
                                                       shardings, mesh)
  report = aot.compile_report(train_step, state_lib.abstract_state(lay, tx, shardings),
                              aot.abstract_tree(lay.split(lay.abstract)[1], frozen_sh),
                              aot.abstract_batch(batch, batch_sh), local=not topology)
  if distributed.is_primary():
    print(aot.format_report(report, mesh))
    print(json.dumps(report), flush=True)  # the last line, for scripts (jaxft.bench.memory)
  return report
