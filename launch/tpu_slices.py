"""Cloud TPU accelerator types: the generations jaxft knows, and `parse_accelerator_type`, which
turns a --accelerator_type (v4-32, v5e-16, gcloud's v5litepod-16, ...) into a slice shape with
its chip and worker counts (launch/tpu_pod.py uses it)."""

import dataclasses
import re


class UsageError(Exception):
  """A bad flag: the message names it and the fix."""


# -- accelerator types ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # what users call it: v4, v5e, ...
  gcloud_prefix: str  # the --accelerator-type prefix gcloud wants: v4, v5litepod, ...
  unit: str  # what the size after the dash counts: "cores" (TensorCores) or "chips"
  runtime: str  # default --version (TPU software version) for JAX
  sizes: tuple[int, ...] = ()  # the sizes there are; () = multiples of 8 up to max_size
  max_size: int = 0
  example: int = 8  # a size to suggest


# Runtime versions: Google's "TPU software versions" page (PyTorch and JAX): v6e
# v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base.
# Sizes: v2/v3/v4/v5p count TensorCores (2 per chip, 4 chips per host); v5e/v6e count chips
# (single-host slices of 1, 4 or 8 chips; larger ones are VMs of 4 chips each).
GENERATIONS = {
    "v2": Generation("v2", "v2", "cores", "tpu-ubuntu2204-base", (8, 32, 128, 256, 512)),
    "v3": Generation("v3", "v3", "cores", "tpu-ubuntu2204-base",
                     (8, 32, 64, 128, 256, 512, 1024, 2048), example=32),
    "v4": Generation("v4", "v4", "cores", "tpu-ubuntu2204-base", max_size=8192, example=32),
    "v5p": Generation("v5p", "v5p", "cores", "v2-alpha-tpuv5", max_size=12288),
    "v5e": Generation("v5e", "v5litepod", "chips", "v2-alpha-tpuv5-lite",
                      (1, 4, 8, 16, 32, 64, 128, 256), example=16),
    "v6e": Generation("v6e", "v6e", "chips", "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
EXAMPLES = "v2-8, v3-32, v4-32, v5p-8, v5e-16 (gcloud: v5litepod-16), v6e-8"


@dataclasses.dataclass(frozen=True)
class Slice:
  generation: Generation
  size: int

  @property
  def accelerator_type(self) -> str:
    """The name gcloud's --accelerator-type takes."""
    return f"{self.generation.gcloud_prefix}-{self.size}"

  @property
  def chips(self) -> int:
    return self.size // 2 if self.generation.unit == "cores" else self.size

  @property
  def workers(self) -> int:
    """TPU VMs (hosts) in the slice: gcloud's --worker=0..workers-1, one JAX process each."""
    if self.generation.unit == "cores":
      return max(1, self.chips // 4)
    return 1 if self.chips <= 8 else self.chips // 4

  def describe(self) -> str:
    cores = f" ({self.size} TensorCores)" if self.generation.unit == "cores" else ""
    return (f"{self.accelerator_type}: {self.chips} chips{cores} on {self.workers} "
            f"worker{'s' if self.workers > 1 else ''} (hosts; one JAX process each, "
            f"{self.chips // self.workers} chips per host)")


def parse_accelerator_type(text: str) -> Slice:
  """'v4-32', 'v5e-16', 'v5litepod-16', 'V6E-8' -> Slice; a UsageError naming the fix else."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.strip().lower())
  gen = GENERATIONS.get(_ALIASES.get(m.group(1), m.group(1))) if m else None
  if gen is None:
    raise UsageError(f"--accelerator_type={text!r} is not a Cloud TPU type this launcher knows: "
                     f"give GENERATION-SIZE, one of {EXAMPLES} (generations: "
                     f"{', '.join(GENERATIONS)}; the size counts TensorCores for v2, v3, v4 and "
                     "v5p, chips for v5e and v6e)")
  size = int(m.group(2))
  if gen.sizes:
    ok, allowed = size in gen.sizes, "one of " + ", ".join(str(s) for s in gen.sizes)
  else:
    ok = size % 8 == 0 and 8 <= size <= gen.max_size
    allowed = f"a multiple of 8 from 8 to {gen.max_size} (whole hosts of 4 chips, 2 cores each)"
  if not ok:
    unit = "TensorCores" if gen.unit == "cores" else "chips"
    raise UsageError(f"--accelerator_type={text!r}: the size of a {gen.name} slice counts its "
                     f"{unit} and must be {allowed}, not {size}; e.g. "
                     f"--accelerator_type={gen.name}-{gen.example}")
  return Slice(gen, size)
