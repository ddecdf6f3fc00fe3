"""Reading text files (plain, .gz, .xz) in a configured encoding, so that every reader of user data
reports undecodable bytes the same way: the file, the line, the byte and the fix.

Files are read as bytes and decoded line by line by an incremental decoder, rather than through a
text-mode file, which decodes 8 KiB ahead: that is what makes the line of a bad byte exact (for
ASCII-compatible encodings: utf-8, latin-1, cp1252, ...; for utf-16 it is approximate). Newlines
are translated as open() in text mode translates them (\\r\\n and \\r become \\n), and a leading
byte-order mark is dropped, so readers see the same text as before. With errors="replace" each
undecodable sequence becomes U+FFFD and one warning per file says how many bytes on how many
lines were replaced.

JSON lines go through `json_value`, which also rejects what json.loads lets through but no text
can hold: an unpaired surrogate escape ("\\ud800"), which would fail later, far from its line,
in the tokenizer or the dataset writer.
"""

import codecs
import dataclasses
import gzip
import io
import json
import logging
import lzma
import re
import threading
import zlib

from jaxft.data.errors import BadInputError, bad_input

log = logging.getLogger("jaxft")

ENCODING_ERRORS = ("strict", "replace")
_PIECE_BYTES = 1 << 20  # a longer line is decoded in pieces of this size
_CORRUPT = (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

_replaced = threading.local()  # bytes replaced by the current thread's decode call


def _count_and_replace(e: UnicodeError):
  if not isinstance(e, UnicodeDecodeError):
    raise e
  _replaced.bytes = getattr(_replaced, "bytes", 0) + e.end - e.start
  return "\ufffd", e.end


codecs.register_error("jaxft.replace", _count_and_replace)


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How to decode user files; `prefix` is how messages name the two options (config fields, or
  a command-line tool's flags)."""

  name: str = "utf-8"
  errors: str = "strict"
  prefix: str = "config.data."

  def __post_init__(self):
    try:
      known = getattr(codecs.lookup(self.name), "_is_text_encoding", True)
    except LookupError:
      known = False
    if not known:
      raise ValueError(f"{self.prefix}encoding={self.name!r} is not a text encoding Python "
                       "knows; use e.g. utf-8, utf-8-sig, latin-1, cp1252 or utf-16")
    if self.errors not in ENCODING_ERRORS:
      raise ValueError(f"{self.prefix}encoding_errors={self.errors!r} is not one of "
                       f"{', '.join(ENCODING_ERRORS)} (replace decodes undecodable bytes as "
                       "U+FFFD and warns how many there were)")

  @classmethod
  def of(cls, data_cfg, prefix: str = "config.data.") -> "Encoding":
    """From a config.data (a ConfigDict or dict); a config without the fields gets utf-8."""
    return cls(str(data_cfg.get("encoding") or "utf-8"),
               str(data_cfg.get("encoding_errors") or "strict"), prefix)

  @classmethod
  def of_flags(cls, encoding: str | None, errors: str | None, data_cfg=None) -> "Encoding":
    """A command-line tool's --encoding / --encoding_errors; each one not given defaults to the
    run's config.data field (the data it was trained on), else utf-8 / strict."""
    data_cfg = data_cfg or {}
    return cls.of({"encoding": encoding or data_cfg.get("encoding"),
                   "encoding_errors": errors or data_cfg.get("encoding_errors")}, prefix="--")

  def fix(self) -> str:
    return (f"set {self.prefix}encoding to the file's encoding (e.g. latin-1 or cp1252), or "
            f"{self.prefix}encoding_errors=replace to decode such bytes as U+FFFD")


UTF8 = Encoding()
FLAGS_UTF8 = Encoding(prefix="--")  # a command-line tool's defaults, named as its flags


def _open_binary(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".xz"):
    return lzma.open(path, "rb")
  return open(path, "rb")


def _corrupt(path: str, e: Exception) -> BadInputError:
  suffix = path[path.rindex("."):]
  kind = "gzip" if suffix == ".gz" else "xz"
  return bad_input(path, None, f"is not a complete {kind} file ({type(e).__name__}: {e})",
                   f"recompress it, or give it uncompressed without the {suffix} suffix")


def _pieces(f, path: str):
  """The file's bytes cut after every line end (\\n, \\r\\n or \\r) and every _PIECE_BYTES."""
  try:
    for raw in iter(lambda: f.readline(_PIECE_BYTES), b""):
      if b"\r" in raw:  # a lone \r also ends a line (universal newlines)
        yield from raw.splitlines(keepends=True)
      else:
        yield raw
  except _CORRUPT as e:
    raise _corrupt(path, e) from None


def _undecodable(path: str, encoding: Encoding, line: int, offset: int, line_start: int,
                 e: UnicodeDecodeError) -> BadInputError:
  bad = " ".join(f"0x{b:02X}" for b in e.object[e.start:min(e.end, e.start + 4)])
  of = "decompressed data" if path.endswith((".gz", ".xz")) else "file"
  return bad_input(path, line, f"has bytes that are not valid {encoding.name} ({e.reason}): "
                   f"{bad} at byte {offset - line_start + 1} of the line (byte offset {offset} "
                   f"of the {of})", encoding.fix())


def _warn_replaced(path: str, encoding: Encoding, n_bytes: int, n_lines: int) -> None:
  log.warning("%s: %d undecodable byte(s) on %d line(s) were not valid %s and were replaced by "
              "U+FFFD (%sencoding_errors=replace)", path, n_bytes, n_lines, encoding.name,
              encoding.prefix)


def _with_end(pieces):
  yield from pieces
  yield None


def read_lines(path: str, encoding: Encoding = UTF8):
  """(line number, line) of a file; every line but perhaps the last ends in "\\n"."""
  errors = "jaxft.replace" if encoding.errors == "replace" else "strict"
  decoder = codecs.getincrementaldecoder(encoding.name)(errors)
  newlines = io.IncrementalNewlineDecoder(None, translate=True)
  line, line_start, offset = 1, 0, 0  # the line being read, where it starts, bytes fed so far
  n_out, carry = 0, ""  # lines yielded, decoded text of the line not yet complete
  replaced_bytes = replaced_lines = 0
  dirty = after_cr = False
  with _open_binary(path) as f:
    for piece in _with_end(_pieces(f, path)):  # None: the end, to flush the decoder
      final = piece is None
      data = b"" if final else piece
      _replaced.bytes = 0
      try:
        text = decoder.decode(data, final)
      except UnicodeDecodeError as e:
        pending = len(e.object) - len(data)  # bytes the decoder held back from earlier pieces
        raise _undecodable(path, encoding, line, offset - pending + e.start, line_start,
                           e) from None
      except UnicodeError as e:  # the stream as a whole, e.g. utf-16 without a byte-order mark
        raise bad_input(path, line, f"has bytes that are not valid {encoding.name} ({e}) by byte "
                        f"offset {offset + len(data)}", encoding.fix()) from None
      if _replaced.bytes:
        replaced_bytes += _replaced.bytes
        dirty = True
      offset += len(data)
      # A \r\n cut between two pieces ends one line, not two.
      ends_line = data.endswith((b"\n", b"\r")) and not (after_cr and data == b"\n")
      after_cr = data.endswith(b"\r")
      if ends_line or final:
        replaced_lines += dirty
        dirty = False
      if ends_line:
        line, line_start = line + 1, offset
      text = newlines.decode(text, final)
      if "\n" not in text:
        carry += text
        continue
      *complete, carry = (carry + text).split("\n")
      for part in complete:
        n_out += 1
        yield n_out, (part.lstrip("\ufeff") if n_out == 1 else part) + "\n"
    if carry:
      yield n_out + 1, carry.lstrip("\ufeff") if n_out == 0 else carry
  if replaced_bytes:
    _warn_replaced(path, encoding, replaced_bytes, replaced_lines)


def read_text(path: str, encoding: Encoding = UTF8) -> str:
  """The whole file as one string (newlines translated, no byte-order mark)."""
  with _open_binary(path) as f:
    try:
      data = f.read()
    except _CORRUPT as e:
      raise _corrupt(path, e) from None
  try:
    # The incremental decoder read_lines uses, in one call: the same text, the same errors.
    text = codecs.getincrementaldecoder(encoding.name)().decode(data, final=True)
  except UnicodeError:
    # Rare: read it again line by line, which says where (strict) or counts what it replaces.
    return "".join(text for _, text in read_lines(path, encoding))
  if "\r" in text:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
  return text.lstrip("\ufeff")


def _lone_surrogate(value) -> str | None:
  """The first string in a JSON value (keys included) that UTF-8 cannot encode, else None."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      return value
    return None
  items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
  for item in items:
    for part in item if isinstance(value, dict) else (item,):
      found = _lone_surrogate(part)
      if found is not None:
        return found
  return None


def json_type(value) -> str:
  """The JSON name of a parsed value's type, for messages."""
  names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
  return names.get(type(value), "number")


def json_value(text: str, path: str, line: int | None, fix: str):
  """json.loads(text), or a BadInputError at path:line (None: the whole file) ending in `fix`."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    at = f"column {e.colno}" if line is not None else f"line {e.lineno}, column {e.colno}"
    raise bad_input(path, line, f"is not valid JSON ({e.msg} at {at})", fix) from None
  except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4,300 digits
    raise bad_input(path, line, f"is not JSON jaxft can read ({type(e).__name__}: {e})",
                    fix) from None
  if _SURROGATE_ESCAPE.search(text):
    found = _lone_surrogate(value)
    if found is not None:
      escape = next(f"\\u{ord(c):04x}" for c in found if 0xD800 <= ord(c) < 0xE000)
      raise bad_input(path, line, f"holds the escape {escape}, half of a surrogate pair with no "
                      "other half: no character", "remove it or complete the pair")
  return value
