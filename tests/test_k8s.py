"""launch/k8s/: every manifest validates against Kubernetes' own JSON schemas (offline,
kubernetes-validate, strict), and the files agree with each other and with the server (its flags
and routes, read from jaxft/serve/) as a user relies on. Each consistency check must also reject
a broken copy; a wheel builds from exactly what the Dockerfile copies."""

import ast
import copy
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import kubernetes_validate
import pytest
import yaml

from jaxft.serve.guard import PROBES
from tests.helpers import ROOT

K8S = os.path.join(ROOT, "launch", "k8s")
ADAPTER_VALUES = os.path.join(K8S, "queue-depth", "prometheus-adapter-values.yaml")
HEALTHZ, READYZ, METRICS = "/healthz", "/readyz", "/metrics"
QUEUE_GAUGE = "jaxft_queue_depth"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CRDS = {"PodMonitor": "monitoring.coreos.com/v1"}  # not in Kubernetes' schemas


def _server_source(name: str) -> ast.Module:
  with open(os.path.join(ROOT, "jaxft", "serve", name)) as f:
    return ast.parse(f.read())


# The server's flags {name: default} (python -m jaxft.serve; its module defines them only under
# __main__, so they are read from the source) and the paths its app serves.
SERVER_FLAGS = {n.args[0].value: getattr(n.args[1], "value", None)
                for n in ast.walk(_server_source("__main__.py"))
                if isinstance(n, ast.Call) and getattr(n.func, "attr", "").startswith("DEFINE_")}
SERVER_ROUTES = {d.args[0].value for n in ast.walk(_server_source("app.py"))
                 if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
                 for d in n.decorator_list if isinstance(d, ast.Call)
                 and getattr(d.func, "attr", "") in ("get", "post")}


def load_all() -> dict:
  """{(kind, path relative to launch/k8s): object} of every manifest."""
  out = {}
  for path in sorted(set(glob.glob(f"{K8S}/**/*.yaml", recursive=True)) - {ADAPTER_VALUES}):
    with open(path) as f:
      for doc in yaml.safe_load_all(f):
        out[(doc["kind"], os.path.relpath(path, K8S))] = doc
  return out


def one(objects: dict, kind: str, rel: str | None = None) -> dict:
  found = [v for (k, r), v in objects.items() if k == kind and (rel is None or r == rel)]
  assert len(found) == 1, f"expected one {kind} ({rel}), found {len(found)}"
  return found[0]


def parse_flags(args: list[str]) -> dict[str, str | bool]:
  """absl's --name=value and boolean --name forms (what launch/k8s writes)."""
  assert all(a.startswith("--") for a in args), f"write flags as --name=value: {args}"
  return dict((a[2:].split("=", 1) + [True])[:2] for a in args)


def container(deployment: dict) -> dict:
  (c,) = deployment["spec"]["template"]["spec"]["containers"]
  return c


def container_port(c: dict, port) -> int:
  """A probe's / Service's port (a number or a port name) as the container's port number."""
  return port if isinstance(port, int) else next(
    p["containerPort"] for p in c["ports"] if p.get("name") == port)


def selects(selector: dict, labels: dict) -> bool:
  return bool(selector) and selector.items() <= labels.items()


# -- schema validation --------------------------------------------------------------------

def test_the_manifests_are_all_there():
  assert sorted(load_all()) == sorted([
    ("Deployment", "deployment.yaml"), ("Service", "service.yaml"), ("PodDisruptionBudget",
    "pdb.yaml"), ("PersistentVolumeClaim", "model-pvc.yaml"), ("HorizontalPodAutoscaler",
    "hpa.yaml"), ("HorizontalPodAutoscaler", "queue-depth/hpa.yaml"),
    ("PodMonitor", "queue-depth/podmonitor.yaml")])
  assert {HEALTHZ, READYZ, METRICS} <= SERVER_ROUTES, SERVER_ROUTES
  assert {"port", "drain_seconds", "api_key_file", "host", "workdir"} <= SERVER_FLAGS.keys()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("key", sorted(load_all()), ids=lambda k: f"{k[0]}-{k[1]}")
def test_manifest_validates_against_the_kubernetes_schema(key, version):
  if key[0] in CRDS:
    assert load_all()[key]["apiVersion"] == CRDS[key[0]]
  else:
    kubernetes_validate.validate(load_all()[key], version, strict=True)


def test_the_validator_rejects_what_kubectl_would():
  """So a pass above means something: a misspelt field and a wrong type both fail."""
  typo, wrong = copy.deepcopy(one(load_all(), "Deployment")), one(load_all(), "Deployment")
  typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
  container(wrong)["ports"][0]["containerPort"] = "8000"
  for broken in (typo, wrong):
    with pytest.raises(kubernetes_validate.ValidationError):
      kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# -- consistency: the checks -----------------------------------------------------------------

def check_probes(ctx: dict) -> None:
  c = container(one(ctx["objects"], "Deployment"))
  port = int(parse_flags(c["args"]).get("port", SERVER_FLAGS["port"]))
  assert [p["containerPort"] for p in c["ports"]] == [port], "containerPort != --port"
  for probe, paths in (("readinessProbe", {READYZ}), ("livenessProbe", {HEALTHZ}),
                       ("startupProbe", {READYZ, HEALTHZ})):
    get = c[probe]["httpGet"]
    assert get["path"] in paths, f"{probe} probes {get['path']}, not {paths}"
    assert get["path"] in PROBES, f"the server wants a key on {get['path']}; probes send none"
    assert container_port(c, get["port"]) == port, f"{probe} probes another port"
  window = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
  assert window >= 300, f"startupProbe gives {window}s; JAX compilation needs minutes"


def check_grace(ctx: dict) -> None:
  d = one(ctx["objects"], "Deployment")
  c = container(d)  # preStop: exec sleep N, or the kubelet's own sleep action (1.30+)
  drain = float(parse_flags(c["args"]).get("drain_seconds", SERVER_FLAGS["drain_seconds"]))
  pre = c["lifecycle"]["preStop"]
  command = pre["exec"]["command"] if "exec" in pre else ["sleep", pre["sleep"]["seconds"]]
  assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
  sleep = float(command[1])
  assert sleep > 0, "no preStop sleep: requests still routed to the pod get refused"
  grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
  assert grace > drain + sleep, (f"terminationGracePeriodSeconds={grace} <= preStop {sleep}s + "
                                 f"--drain_seconds={drain}: draining gets SIGKILLed")


def check_selectors(ctx: dict) -> None:
  d, service = one(ctx["objects"], "Deployment"), one(ctx["objects"], "Service")
  labels, c = d["spec"]["template"]["metadata"]["labels"], container(d)
  assert selects(d["spec"]["selector"]["matchLabels"], labels), "Deployment selector"
  assert selects(service["spec"]["selector"], labels), "the Service selects no pod"
  assert [container_port(c, p["targetPort"]) for p in service["spec"]["ports"]] == [
    c["ports"][0]["containerPort"]], "the Service targets another port"
  pdb = one(ctx["objects"], "PodDisruptionBudget")
  assert selects(pdb["spec"]["selector"]["matchLabels"], labels), "the PDB selects no pod"
  assert all(selects(s["labelSelector"]["matchLabels"], labels)
             for s in d["spec"]["template"]["spec"]["topologySpreadConstraints"])


def check_hpas(ctx: dict) -> None:
  objects = ctx["objects"]
  d = one(objects, "Deployment")
  hpas = [v for (k, _), v in objects.items() if k == "HorizontalPodAutoscaler"]
  assert len(hpas) == 2 and len({h["metadata"]["name"] for h in hpas}) == 1, (
    "queue-depth/hpa.yaml must replace hpa.yaml (same name), not add a second HPA")
  for hpa in hpas:
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
      "apps/v1", "Deployment", d["metadata"]["name"]), "the HPA scales something else"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert all(m["resource"]["name"] in container(d)["resources"]["requests"]  # utilisation:
               for m in hpa["spec"]["metrics"] if m["type"] == "Resource")  # % of the request
  assert [m["pods"]["metric"]["name"] for h in hpas for m in h["spec"]["metrics"]
          if m["type"] == "Pods"] == [QUEUE_GAUGE]
  (rule,) = ctx["adapter"]["rules"]["custom"]
  assert rule["name"]["as"] == QUEUE_GAUGE and QUEUE_GAUGE in rule["seriesQuery"], (
    "prometheus-adapter serves another metric than the HPA reads")
  assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
  # The PodMonitor scrapes those pods' /metrics, with the key (/metrics is not a probe).
  monitor = one(objects, "PodMonitor")
  assert selects(monitor["spec"]["selector"]["matchLabels"],
                 d["spec"]["template"]["metadata"]["labels"]), "the PodMonitor selects no pod"
  (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
  assert container_port(container(d), endpoint["port"]) == container(d)["ports"][0][
    "containerPort"] and endpoint["path"] == METRICS, "the PodMonitor scrapes elsewhere"
  (secret,) = [v["secret"] for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v]
  assert METRICS in PROBES or endpoint["authorization"]["credentials"] == {
    "name": secret["secretName"], "key": secret["items"][0]["key"]}, "scrapes without the key"


def check_volumes(ctx: dict) -> None:
  objects, readme = ctx["objects"], ctx["readme"]
  d = one(objects, "Deployment")
  c, spec = container(d), d["spec"]["template"]["spec"]
  flags = parse_flags(c["args"])
  volumes = {v["name"]: v for v in spec["volumes"]}
  mounts = {m["name"]: m for m in c["volumeMounts"]}
  # The API key: a Secret volume, mounted, its file passed as --api_key_file.
  (key_volume,) = [v for v in volumes.values() if "secret" in v]
  assert key_volume["name"] in mounts, "the API key Secret is not mounted"
  secret, (item,) = key_volume["secret"], key_volume["secret"]["items"]
  key_file = f"{mounts[key_volume['name']]['mountPath'].rstrip('/')}/{item['path']}"
  assert flags.get("api_key_file") == key_file, f"--api_key_file is not {key_file}"
  assert secret["defaultMode"] & 0o007 == 0, "the key file is world-readable"
  # README's command creates that Secret with that key.
  created = re.findall(r"kubectl create secret generic (\S+) --from-file=(\w+)=", readme)
  assert created == [(secret["secretName"], item["key"])], created
  # The model: the PVC of model-pvc.yaml, read-only, at --workdir.
  (model,) = [v for v in volumes.values() if "persistentVolumeClaim" in v]
  claim = model["persistentVolumeClaim"]
  assert claim["claimName"] == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
  assert mounts[model["name"]]["mountPath"] == flags.get("workdir"), "--workdir is not the model"
  assert mounts[model["name"]].get("readOnly") and claim.get("readOnly"), "model mounted writable"


def check_security(ctx: dict) -> None:
  d, dockerfile = one(ctx["objects"], "Deployment"), ctx["dockerfile"]
  c, spec = container(d), d["spec"]["template"]["spec"]
  pod = spec["securityContext"]
  assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, "the pod runs as root"
  assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == dockerfile["USER"], "uid != the image's"
  sc = c["securityContext"]
  assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, sc
  assert sc["capabilities"]["drop"] == ["ALL"]
  # A read-only root needs a writable /tmp (Python, JAX and matplotlib write there).
  volumes = {v["name"]: v for v in spec["volumes"]}
  tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
  assert tmp and "emptyDir" in volumes[tmp[0]["name"]], "read-only root without a /tmp emptyDir"
  for name in ("cpu", "memory"):
    assert name in c["resources"]["requests"] and name in c["resources"]["limits"], name


def check_bind(ctx: dict) -> None:
  """Every set of flags the server is started with (the Deployment's args, the image's CMD, each
  `python -m jaxft.serve` / `docker run` line of README.md): a public --host needs a key."""
  commands = [container(one(ctx["objects"], "Deployment"))["args"], ctx["dockerfile"]["CMD"]]
  for line in re.sub(r"\\\n\s*", " ", ctx["readme"]).splitlines():
    if "jaxft.serve" in line or "docker run" in line:  # flags: --name=value, or --insecure
      commands.append([w for w in line.split("#")[0].split()
                       if w.startswith("--") and "=" in w or w == "--insecure"])
  for args in commands:
    flags = parse_flags([a for a in args if a.startswith("--")])
    assert flags.keys() <= SERVER_FLAGS.keys(), f"not a flag of the server: {args}"
    assert "insecure" not in flags, f"--insecure in {args}"
    if flags.get("host") not in (None, "127.0.0.1", "localhost", "::1"):
      assert flags.get("api_key_file"), f"--host={flags['host']} without --api_key_file: {args}"


def parse_dockerfile(path: str) -> dict:
  """The last of each instruction (continuation lines joined); every FROM and COPY."""
  out: dict = {"FROM": [], "COPY": []}
  with open(path) as f:
    lines = [x.strip() for x in re.sub(r"\\\n", " ", f.read()).splitlines()]
  for word, rest in (x.split(None, 1) for x in lines if x and not x.startswith("#")):
    if word in ("FROM", "COPY"):
      out[word].append(rest)
    else:  # ENTRYPOINT / CMD in the exec form are JSON arrays
      out[word] = yaml.safe_load(rest) if word in ("ENTRYPOINT", "CMD") else rest
  return out


def check_dockerfile(ctx: dict) -> None:
  df, d = ctx["dockerfile"], one(ctx["objects"], "Deployment")
  assert df["FROM"] and all(re.match(r"python:3\.1[1-9]-slim\b", f) for f in df["FROM"]), (
    f"not a python slim base: {df['FROM']}")
  assert df["ENTRYPOINT"] == ["python", "-m", "jaxft.serve"], df["ENTRYPOINT"]
  uid = df["USER"].split(":")[0]
  assert uid.isdigit() and int(uid) != 0, "the image runs as root"
  assert int(df["EXPOSE"]) == container(d)["ports"][0]["containerPort"], "EXPOSE != the port"
  assert "command" not in container(d), "the Deployment must keep the image's ENTRYPOINT"


# -- consistency: the real files, then broken copies -------------------------------------------

@pytest.fixture(scope="module")
def real() -> dict:
  with open(ADAPTER_VALUES) as adapter, open(os.path.join(K8S, "README.md")) as readme:
    return {"objects": load_all(), "adapter": yaml.safe_load(adapter), "readme": readme.read(),
            "dockerfile": parse_dockerfile(os.path.join(K8S, "Dockerfile"))}


CHECKS = {f.__name__.removeprefix("check_"): f for f in (
  check_probes, check_grace, check_selectors, check_hpas, check_volumes, check_security,
  check_bind, check_dockerfile)}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_the_manifests_agree_with_each_other_and_the_server(real, check):
  CHECKS[check](real)


def _container(ctx):
  return container(one(ctx["objects"], "Deployment"))


def _put(where: str, path: list, value):
  """Sets `path` of `where` ("Kind [rel]", "adapter" or "dockerfile") to `value`."""
  def apply(c):
    node = c[where] if where in ("adapter", "dockerfile") else one(c["objects"], *where.split())
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  return apply


def _set_flag(name, value):
  def apply(c):
    args = _container(c)["args"]
    args[:] = [a for a in args if not a.startswith(f"--{name}=")] + (
      [f"--{name}={value}"] if value is not None else [])
  return apply


def _readme(old, new):
  return lambda c: c["readme"].index(old) >= 0 and c.update(readme=c["readme"].replace(old, new))


def _unmount(path):
  return lambda c: _container(c).update(volumeMounts=[
    m for m in _container(c)["volumeMounts"] if m["mountPath"] != path])


D, POD, NAME = "Deployment", ["spec", "template", "spec"], "app.kubernetes.io/name"
C, Q = [*POD, "containers", 0], "HorizontalPodAutoscaler queue-depth/hpa.yaml"
H, PM, EP = "HorizontalPodAutoscaler hpa.yaml", "PodMonitor", ["spec", "podMetricsEndpoints", 0]
SEL, DF, PVC = ["spec", "selector", "matchLabels", NAME], "dockerfile", "persistentVolumeClaim"
# (what is broken, the check that must reject it, how: a function or where + path + value)
BREAKAGES = {b[0]: (b[1], b[2] if len(b) == 3 else _put(*b[2:])) for b in [
  ("readiness on /healthz", "probes", D, [*C, "readinessProbe", "httpGet", "path"], HEALTHZ),
  ("liveness on /readyz", "probes", D, [*C, "livenessProbe", "httpGet", "path"], READYZ),
  ("probe on another port", "probes", D, [*C, "livenessProbe", "httpGet", "port"], 9000),
  ("--port differs from containerPort", "probes", _set_flag("port", 9000)),
  ("startup window of 60 s", "probes", D, [*C, "startupProbe", "failureThreshold"], 6),
  ("startup probe on /metrics", "probes", D, [*C, "startupProbe", "httpGet", "path"], METRICS),
  ("grace == drain + preStop", "grace", D, [*POD, "terminationGracePeriodSeconds"], 40),
  ("drain longer than the grace", "grace", _set_flag("drain_seconds", 55)),
  ("no preStop sleep", "grace", D, [*C, "lifecycle", "preStop", "exec", "command", 1], "0"),
  ("Service selects other pods", "selectors", "Service", ["spec", "selector", NAME], "x"),
  ("Service targets another port", "selectors", "Service", ["spec", "ports", 0, "targetPort"], 1),
  ("PDB selects other pods", "selectors", "PodDisruptionBudget", SEL, "x"),
  ("HPA on another Deployment", "hpas", H, ["spec", "scaleTargetRef", "name"], "jaxft"),
  ("queue HPA under another name", "hpas", Q, ["metadata", "name"], "jaxft-q"),
  ("adapter serves another metric", "hpas", "adapter", ["rules", "custom", 0, "name", "as"], "x"),
  ("PodMonitor on other pods", "hpas", PM, SEL, "x"),
  ("PodMonitor scrapes elsewhere", "hpas", PM, [*EP, "path"], "/stats"),
  ("PodMonitor without the key", "hpas", PM, [*EP, "authorization", "credentials", "key"], "x"),
  ("a flag the server lacks", "bind", _set_flag("tensor_parallel", "2")),
  ("Secret not mounted", "volumes", _unmount("/etc/jaxft/api-key")),
  ("--api_key_file elsewhere", "volumes", _set_flag("api_key_file", "/etc/key")),
  ("key file world-readable", "volumes", D, [*POD, "volumes", 1, "secret", "defaultMode"], 0o444),
  ("README's Secret named otherwise", "volumes", _readme("generic jaxft-api-key", "generic k")),
  ("--workdir not the model mount", "volumes", _set_flag("workdir", "/models")),
  ("model mounted writable", "volumes", D, [*POD, "volumes", 0, PVC, "readOnly"], False),
  ("0.0.0.0 without a key", "bind", _set_flag("api_key_file", None)),
  ("--insecure", "bind", lambda c: _container(c)["args"].append("--insecure")),
  ("README serves 0.0.0.0 keyless", "bind",
   _readme("--host=0.0.0.0 --api_key_file=/key", "--host=0.0.0.0")),
  ("image serves 0.0.0.0 keyless", "bind", DF, ["CMD", 0], "--host=0.0.0.0"),
  ("runs as root", "security", D, [*POD, "securityContext", "runAsUser"], 0),
  ("uid differs from the image's", "security", D, [*POD, "securityContext", "runAsUser"], 1000),
  ("writable root", "security", D, [*C, "securityContext", "readOnlyRootFilesystem"], False),
  ("no writable /tmp", "security", _unmount("/tmp")),
  ("no memory limit", "security", lambda c: _container(c)["resources"]["limits"].pop("memory")),
  ("image as root", "dockerfile", DF, ["USER"], "0:0"),
  ("image exposes another port", "dockerfile", DF, ["EXPOSE"], "8080"),
  ("image runs something else", "dockerfile", DF, ["ENTRYPOINT"], ["python", "x"]),
  ("full python base", "dockerfile", DF, ["FROM", 1], "python:3.11"),
  ("Deployment overrides the entrypoint", "dockerfile", D, [*C, "command"], ["python"]),
]}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_check_rejects_a_broken_copy(real, name):
  check, breaks, broken = *BREAKAGES[name], copy.deepcopy(real)
  breaks(broken)
  with pytest.raises(AssertionError):
    CHECKS[check](broken)


# -- the image's sources ---------------------------------------------------------------------

def test_a_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path):
  """The build stage copies a few paths, not the checkout: those must be enough for
  `pip wheel .`, and the wheel must hold the server."""
  df, src = parse_dockerfile(os.path.join(K8S, "Dockerfile")), tmp_path / "src"
  src.mkdir()
  for *sources, dest in (line.split() for line in df["COPY"] if not line.startswith("--from")):
    for s in sources:  # COPY a b ./ keeps the names; COPY jaxft ./jaxft names the target
      path, target = os.path.join(ROOT, s), src / (
        os.path.basename(s) if dest.endswith("/") else dest.removeprefix("./"))
      (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, target)
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "--no-index", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                     capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stdout + r.stderr
  (wheel,) = glob.glob(str(tmp_path / "wheels" / "*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  assert "jaxft/serve/redact.py" in names and "jaxft/serve/__init__.py" in names
  assert any(n.startswith("jaxft/data/corpus/") and n.endswith(".xz") for n in names)
