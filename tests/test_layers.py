"""The package's layers import only downward (docs/code-layout.md): parsed from the source, so a
new import against the order, an import cycle, a library import of configs/ or an unexplained
function-local import fails here before it can grow into a tangle."""

import ast
import os

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "jaxft")

# Lowest first. A module may import its own package and any package of a lower layer.
LAYERS = (
    ("jaxft.trees", "jaxft.parallel"),
    ("jaxft.models",),
    ("jaxft.peft", "jaxft.quant"),
    ("jaxft.hf",),
    ("jaxft.data",),
    ("jaxft.tasks",),
    ("jaxft.run",),
    ("jaxft.training", "jaxft.inference"),
    ("jaxft.serve", "jaxft.trimming", "jaxft.sweeping", "jaxft.lifelong"),
    ("jaxft.bench", "jaxft.train", "jaxft.evaluate", "jaxft.predict", "jaxft.generate",
     "jaxft.export", "jaxft.prompt_eval",
     "jaxft.quantize", "jaxft.trim", "jaxft.augment", "jaxft.sweep", "jaxft.continual"),
)
# Function-local imports are for heavy optional dependencies only (each with a comment saying
# so); everything else is imported at the top of its module, where this test sees the order.
LOCAL_IMPORT_ALLOWED = ("torch", "transformers", "matplotlib", "libtpu")


def modules() -> dict[str, str]:
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[module.removesuffix(".__init__")] = path
  return out


def unit_of(module: str) -> str:
  """The layer entry a module belongs to (its package, or itself for a top-level module)."""
  for layer in LAYERS:
    for unit in layer:
      if module == unit or module.startswith(unit + "."):
        return unit
  return "jaxft"  # the package's __init__


def layer_of(module: str) -> int:
  unit = unit_of(module)
  return next((i for i, layer in enumerate(LAYERS) if unit in layer), -1)


def imports(path: str, known: dict) -> list[tuple[str, int, bool, str]]:
  """(imported jaxft/configs module, line, is function-local, source line) of a file."""
  source = open(path).read().splitlines()
  tree = ast.parse("\n".join(source))
  out = []
  local_nodes = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      local_nodes.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from jaxft.run import state` imports the module jaxft.run.state.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
               for a in node.names]
    else:
      continue
    line = source[node.lineno - 1] + " " + (source[node.lineno - 2] if node.lineno > 1 else "")
    for name in names:
      out.append((name, node.lineno, id(node) in local_nodes, line))
  return out


def test_imports_follow_the_layer_order_without_cycles():
  known = modules()
  graph, against, configs, local = {}, [], [], []
  for module, path in known.items():
    graph[module] = set()
    for name, line, is_local, text in imports(path, known):
      root = name.split(".")[0]
      if root == "configs":
        configs.append(f"{module}:{line}")
      if is_local:
        allowed = root in LOCAL_IMPORT_ALLOWED and "#" in text
        if not allowed:
          local.append(f"{module}:{line} ({name})")
      if root != "jaxft":
        continue
      target = name if name in known else name.rsplit(".", 1)[0]
      if target not in known or target == module:
        continue
      graph[module].add(target)
      same_unit = unit_of(target) == unit_of(module)
      if not same_unit and layer_of(target) >= layer_of(module) and unit_of(target) != "jaxft":
        against.append(f"{module} -> {target}")
  assert not configs, f"the library imports configs/: {configs}"
  assert not against, f"imports against the layer order: {against}"
  assert not local, ("function-local imports outside heavy optional dependencies (or without "
                     f"a comment saying why): {local}")
  # No cycle, even within a package (a cycle hides behind function-local imports otherwise).
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in graph[m]:
      if state.get(n) == 1:
        raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
      if n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in graph:
    if m not in state:
      visit(m, [m])


def test_every_module_has_a_layer_and_stays_small():
  for module, path in modules().items():
    assert module == "jaxft" or layer_of(module) >= 0, f"{module} is in no layer of LAYERS"
    lines = len(open(path).read().splitlines())
    assert lines <= 400, f"{path} has {lines} lines; split it by job (<= 400)"


def test_the_layer_test_catches_what_it_claims(tmp_path):
  """The checker itself: an upward import is flagged, a downward one is not."""
  assert layer_of("jaxft.models.gpt2") < layer_of("jaxft.run.loader")
  assert layer_of("jaxft.train") == len(LAYERS) - 1
  assert unit_of("jaxft.parallel.sharding") == "jaxft.parallel"
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from jaxft.run import loader\n  return loader\n")
  found = imports(str(bad), {"jaxft.run.loader": "x"})
  assert found == [("jaxft.run.loader", 2, True, found[0][3])]
