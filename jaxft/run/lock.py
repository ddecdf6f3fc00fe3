"""One run per workdir: workdir/jaxft.lock, held by process 0 for the whole run.

The lock is an flock on the file (the kernel drops it when its process dies, SIGKILL included,
so a crashed run never leaves a lock that blocks the rerun) plus the holder's pid, host, start
time and command in the file, for the message a second run gets. A file whose lock nobody holds
is a stale one (its process is gone): it is taken over with a warning.
"""

import datetime
import fcntl
import json
import logging
import os
import socket
import sys

LOCK_FILE = "jaxft.lock"

log = logging.getLogger("jaxft")


class WorkdirLockedError(RuntimeError):
  pass


class WorkdirLock:
  """`with WorkdirLock(workdir):` refuses (WorkdirLockedError) while another run holds it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _describe(_read(fd))
      os.close(fd)
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another run ({holder}): two runs in one "
          "workdir would interleave its metrics and checkpoints. Wait for it to finish or stop "
          f"it, or train into another --workdir. (The lock is {self.path}.)") from None
    previous = _read(fd)
    if previous:
      log.warning("taking over the stale lock of a run that is gone (%s)", _describe(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Empties the file and drops the lock: an empty file is no holder (not a stale lock)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _read(fd: int) -> dict:
  data = os.pread(fd, 65536, 0)
  if not data.strip():
    return {}
  try:
    record = json.loads(data)
  except ValueError:
    return {"unreadable": data[:80].decode("utf-8", "replace")}
  return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
  if not record:
    return "no holder recorded"
  if "unreadable" in record:
    return f"unreadable lock contents {record['unreadable']!r}"
  return (f"pid {record.get('pid')} on host {record.get('host')}, started "
          f"{record.get('started')}: {record.get('command', '')}").rstrip(": ")
