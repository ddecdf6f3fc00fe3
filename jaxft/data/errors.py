"""The one error for input data a user can fix (a file that cannot be decoded, a malformed row, a
missing field): it names the file, the line when there is one, what is wrong and the fix.

It subclasses ValueError so that code catching bad settings and bad data alike keeps working; the
command-line tools print its message without a traceback.
"""


class BadInputError(ValueError):
  """Bad input data; `path` and `line` (1-based, or None) say where, `str(e)` says all."""

  def __init__(self, message: str, path: str | None = None, line: int | None = None):
    super().__init__(message)
    self.path = path
    self.line = line

  def __reduce__(self):
    # The default pickling passes only args to __init__; keep where the error is.
    return type(self), (str(self), self.path, self.line)

  def replace(self, old: str, new: str) -> "BadInputError":
    """The same error with `old` replaced by `new` in its message: a command-line tool names its
    flags (--encoding) where the library names config fields (config.data.encoding)."""
    return type(self)(str(self).replace(old, new), self.path, self.line)


def where(path: str, line: int | None = None) -> str:
  return path if line is None else f"{path}:{line}"


def bad_input(path: str, line: int | None, problem: str, fix: str = "") -> BadInputError:
  """`path:line problem; fix`, e.g. "a.csv:7 has 3 columns, but the header has 2 ([...]); quote
  fields that hold commas". `problem` reads as a predicate of the place ("has", "is")."""
  message = f"{where(path, line)} {problem}"
  return BadInputError(f"{message}; {fix}" if fix else message, path, line)
