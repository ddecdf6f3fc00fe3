"""The search space: `--param name=kind:args` specs, and setting a trial's values on the base
config (dotted fields, type-checked against the field already there).

    optim.lr=loguniform:1e-5:1e-3     a float, sampled uniformly in log space
    model.resid_pdrop=uniform:0:0.3   a float, uniformly
    peft.rank=int:4:32                an int in [4, 32]; int:4:32:4 steps by 4; int:4:32:log
    peft.rank=choice:4,8,16           one of the listed values, each typed: ints, floats,
                                      true/false, anything else a string
"""

import dataclasses
import math

import ml_collections
import optuna

KINDS = ("loguniform", "uniform", "int", "choice")
_EXAMPLE = "e.g. --param optim.lr=loguniform:1e-5:1e-3 or --param peft.rank=choice:4,8,16"


class SpecError(ValueError):
  """A --param that does not parse or does not fit the base config."""


@dataclasses.dataclass(frozen=True)
class Param:
  name: str  # the dotted config field (optim.lr)
  kind: str  # one of KINDS
  low: float | int | None = None
  high: float | int | None = None
  step: int | None = None  # int only
  log: bool = False  # loguniform, or int:...:log
  choices: tuple = ()

  @property
  def spec(self) -> str:
    if self.kind == "choice":
      return f"{self.name}=choice:{','.join(_show(c) for c in self.choices)}"
    tail = f":{self.step}" if self.step else (":log" if self.kind == "int" and self.log else "")
    return f"{self.name}={self.kind}:{_show(self.low)}:{_show(self.high)}{tail}"

  @property
  def continuous(self) -> bool:
    return self.kind != "choice"

  def distribution(self) -> optuna.distributions.BaseDistribution:
    if self.kind == "choice":
      return optuna.distributions.CategoricalDistribution(self.choices)
    if self.kind == "int":
      return optuna.distributions.IntDistribution(self.low, self.high, log=self.log,
                                                  step=self.step or 1)
    return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


def _show(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def _number(text: str, spec: str, what: str, kind=float):
  try:
    value = kind(text)
  except ValueError:
    noun = "an int" if kind is int else "a number"
    raise SpecError(f"--param {spec}: {what} {text!r} is not {noun}; {_EXAMPLE}") from None
  if isinstance(value, float) and not math.isfinite(value):
    raise SpecError(f"--param {spec}: {what} must be finite, not {text!r}")
  return value


def typed(text: str):
  """A choice's value: int, float, bool (true/false), else the string itself."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text.strip()


def parse(spec: str) -> Param:
  """One `name=kind:args` spec -> Param; errors name the spec and the fix."""
  name, eq, rest = spec.partition("=")
  name = name.strip()
  if not eq or not name or ":" not in rest:
    raise SpecError(f"--param {spec!r} is not NAME=KIND:ARGS (KIND one of {', '.join(KINDS)}); "
                    f"{_EXAMPLE}")
  kind, _, args = rest.partition(":")
  kind = kind.strip()
  if kind not in KINDS:
    raise SpecError(f"--param {spec}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
  if kind == "choice":
    choices = tuple(typed(c) for c in args.split(","))
    if not args.strip() or any(c == "" for c in choices):
      raise SpecError(f"--param {spec}: choice needs comma-separated values, e.g. "
                      f"{name}=choice:4,8,16")
    if len(set(choices)) != len(choices):
      raise SpecError(f"--param {spec}: a choice is listed twice")
    return Param(name, kind, choices=choices)
  parts = args.split(":")
  extra = parts[2:] if kind == "int" else []
  if len(parts) != 2 + len(extra) or len(extra) > 1:
    form = "int:LOW:HIGH[:STEP|:log]" if kind == "int" else f"{kind}:LOW:HIGH"
    raise SpecError(f"--param {spec}: write {name}={form}")
  number = int if kind == "int" else float
  low = _number(parts[0], spec, "LOW", number)
  high = _number(parts[1], spec, "HIGH", number)
  if not low < high:
    raise SpecError(f"--param {spec}: LOW must be below HIGH ({low} >= {high})")
  if kind == "loguniform" and low <= 0:
    raise SpecError(f"--param {spec}: loguniform needs LOW > 0 (got {low}); use uniform for a "
                    "range that includes 0")
  step, log = None, kind == "loguniform"
  if extra and extra[0] == "log":
    if low <= 0:
      raise SpecError(f"--param {spec}: int:...:log needs LOW > 0")
    log = True
  elif extra:
    step = _number(extra[0], spec, "STEP", int)
    if step <= 0:
      raise SpecError(f"--param {spec}: STEP must be positive")
  return Param(name, kind, low, high, step, log)


def parse_all(specs: list[str], base: ml_collections.ConfigDict) -> list[Param]:
  """Every --param, each checked against the base config (its field exists and takes the
  values); a field given twice is an error."""
  if not specs:
    raise SpecError(f"give at least one --param; {_EXAMPLE}")
  params = [parse(s) for s in specs]
  seen = set()
  for p in params:
    if p.name in seen:
      raise SpecError(f"--param {p.name} is given twice; give each field once")
    seen.add(p.name)
    values = p.choices or (p.low, p.high)
    for v in values:
      set_field(base.copy_and_resolve_references(), p.name, v)  # raises on a misfit
  return params


def set_field(config: ml_collections.ConfigDict, name: str, value) -> None:
  """config.<name> = value, refusing an unknown field (naming it and the fields there) or a
  value of the wrong type (an int field takes ints; a float field takes ints and floats)."""
  node, path = config, name.split(".")
  for i, key in enumerate(path):
    where = ".".join(path[:i]) or "the config"
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise SpecError(f"--param {name}: config.{'.'.join(path[:i + 1])} is not a field of "
                      f"{where} (its fields: {', '.join(known)})")
    if i < len(path) - 1:
      node = node[key]
  leaf = path[-1]
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise SpecError(f"--param {name}: config.{name} is a group of fields; name one of them "
                    f"({', '.join(sorted(current.keys()))})")
  ok = (current is None or type(value) is type(current)
        or (isinstance(current, float) and type(value) is int))
  if not ok:
    kind = type(current).__name__
    hint = "; sample it with int:LOW:HIGH or choice:" if kind == "int" else ""
    raise SpecError(f"--param {name}: config.{name} is {'an' if kind == 'int' else 'a'} {kind} "
                    f"({current!r}) and cannot take {value!r} ({type(value).__name__}){hint}")
  if isinstance(current, float):
    value = float(value)
  with node.unlocked():
    node[leaf] = value


def apply(base: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """A copy of the base config with a trial's values set."""
  config = base.copy_and_resolve_references()
  for name, value in values.items():
    set_field(config, name, value)
  return config
