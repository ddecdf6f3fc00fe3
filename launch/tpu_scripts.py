"""The bash scripts launch/tpu_pod.py runs on every TPU VM worker (over gcloud ssh): install the
checkout, start a run in the background of each worker, stop it, follow its log. Kept apart from
the launcher so that tests can shellcheck them."""

import os
import re
import shlex
import tempfile

# Paths on every worker (bash syntax: $HOME expands there, not here).
REMOTE_DIR = "$HOME/jaxft"
REMOTE_VENV = "$HOME/jaxft-venv"
REMOTE_LOGS = "$HOME/jaxft-logs"
REMOTE_TARBALL = "jaxft-src.tar.gz"  # relative to the worker's home, where scp puts it
# The worker's index in the slice, the same number gcloud's --worker=N and JAX's process id use.
WORKER_ID = ('W=$(curl -sf -H "Metadata-Flavor: Google" http://metadata.google.internal/'
             "computeMetadata/v1/instance/attributes/agent-worker-number || hostname)")

def join(script: list[str]) -> str:
  """Statements -> one line: '; ' between them, but only ' ' after a background '&'."""
  return "".join(s + (" " if s.endswith("&") else "; ") for s in script[:-1]) + script[-1]


def _dq(text: str) -> str:
  """Double-quoted for bash (inside the single quotes --dry-run prints around --command)."""
  return '"' + re.sub(r'(["\\$`])', r"\\\1", text) + '"'


def local_tarball(name: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"jaxft-{name}-src.tar.gz")


def setup_script(args) -> list[str]:
  d, venv = f'"{REMOTE_DIR}"', f'"{REMOTE_VENV}"'
  if args.repo:
    fetch = [f"if [ ! -d {d}/.git ]; then git clone -q {_dq(args.repo)} {d}; fi",
             f"git -C {d} fetch -q origin {_dq(args.ref)}",
             f"git -C {d} checkout -q FETCH_HEAD"]
  else:  # the tarball `setup` copied; extracting over an old copy keeps runs/ and other files
    fetch = [f"mkdir -p {d}", f'tar -xzf "$HOME/{REMOTE_TARBALL}" -C {d}']
  return [
      "set -euo pipefail",
      WORKER_ID,
      *fetch,
      # The TPU images ship Python 3.10; jaxft needs >= 3.11: uv brings its own.
      'UV="$HOME/.local/bin/uv"',
      'if [ ! -x "$UV" ]; then python3 -m pip install -q --user --upgrade uv; fi',
      f'if [ ! -x {venv}/bin/python ]; then "$UV" venv -q --python {_dq(args.python)} {venv}; fi',
      f'"$UV" pip install -q --python {venv}/bin/python -e {d} {_dq(args.jax_spec)}',
      # Import only: initialising the TPU backend on a pod would wait for every host.
      f'V=$({venv}/bin/python -c "import jax, jaxft; print(jax.__version__)")',
      'echo "[worker $W] jaxft installed (jax $V)"',
  ]


def run_script(command: list[str], detach: bool) -> list[str]:
  cmd = _dq(shlex.join(command))
  lines = [
      "set -uo pipefail",
      WORKER_ID,
      f'L="{REMOTE_LOGS}"',
      'LOG="$L/worker-$W.log"',
      'PIDF="$L/run.pid"',
      'mkdir -p "$L"',
      'if [ -s "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then echo "[worker $W] a run is '
      'still going (pid $(cat "$PIDF")): stop it first (python -m launch.tpu_pod stop)"; exit 1; '
      "fi",
      f'cd "{REMOTE_DIR}" || exit 1',
      f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $W: "{cmd} >> "$LOG"',
      'START=$(stat -c %s "$LOG")',  # where this run's output begins
      # setsid + nohup: the run outlives this ssh session; its process group is what stop kills.
      f'PATH="{REMOTE_VENV}/bin:$PATH" PYTHONUNBUFFERED=1 JAXFT_DISTRIBUTED=auto nohup setsid '
      f'bash -c {cmd} '
      '>> "$LOG" 2>&1 < /dev/null &',
      "P=$!",
      'echo "$P" > "$PIDF"',
  ]
  if detach:
    lines.remove('START=$(stat -c %s "$LOG")')
    lines.append('echo "[worker $W] started (pid $P), log $LOG"')
  else:
    lines += [
        'tail -c +$((START + 1)) --pid="$P" -f "$LOG" | sed -u "s/^/[worker $W] /"',
        'wait "$P"',
        "RC=$?",
        'echo "[worker $W] exit status $RC"',
        'exit "$RC"',
    ]
  return lines


STOP_SCRIPT = [
    WORKER_ID,
    f'PIDF="{REMOTE_LOGS}/run.pid"',
    'if [ -s "$PIDF" ] && P=$(cat "$PIDF") && kill -0 "$P" 2>/dev/null; then '
    'kill -TERM -- "-$P"; '
    'for _ in $(seq 30); do kill -0 "$P" 2>/dev/null || break; sleep 1; done; '
    'if kill -0 "$P" 2>/dev/null; then kill -KILL -- "-$P"; fi; '
    'echo "[worker $W] stopped the run (process group $P)"; '
    'else echo "[worker $W] no run going"; fi',
]


def follow_script(lines: int) -> list[str]:
  return [WORKER_ID,
          f'tail -n {int(lines)} -F "{REMOTE_LOGS}/worker-$W.log" | sed -u "s/^/[worker $W] /"']
