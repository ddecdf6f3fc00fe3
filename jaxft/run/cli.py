"""What the command-line entry points share: a user's error (bad config, bad input file, a
refused resume, a locked workdir, a failed save) is one line, `jaxft.<command>: <message>`, and
exit code 1, not a traceback. JAXFT_TRACEBACK=1 shows the traceback (to report a jaxft bug)."""

import contextlib
import os

# Errors whose message is written for the user: jaxft's own classes, and the ValueError /
# OSError family jaxft raises for config and file problems (each names the field or the file).
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                NotADirectoryError)


def is_user_error(error: BaseException) -> bool:
  return (isinstance(error, _USER_ERRORS)
          or type(error).__module__.split(".")[0] == "jaxft" and isinstance(error, Exception))


@contextlib.contextmanager
def user_errors(command: str):
  """A user's error raised inside becomes `jaxft.<command>: <message>` on stderr, exit code 1
  (as jaxft.predict, generate and prompt_eval report bad input)."""
  try:
    yield
  except Exception as e:
    if not is_user_error(e) or os.environ.get("JAXFT_TRACEBACK") == "1":
      raise
    raise SystemExit(f"jaxft.{command}: {e}") from None
