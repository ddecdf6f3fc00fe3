"""What the server may write to its logs about a request: personal data masked.

`redact(text)` replaces e-mail addresses with [EMAIL], card-like numbers with [CARD] and phone
numbers with [PHONE]; `describe_request` is the one line the server logs per request (by
default the path and the body's size and field names, never its content).

What counts (ASCII digits and letters only; the patterns are written to run in linear time,
because request bodies can be large and a log call must never hang a worker):

- e-mail: local part @ dotted domain whose last label starts with a letter
  (`a.b+tag@mail.example.co.uk`). The local part takes RFC 5322's characters except
  / = ? & { | } ` (so a URL or query string around an address is not swallowed; an address using
  them keeps what comes before such a character in the log). Non-ASCII addresses are not
  recognised.
- card: 13-19 digits, contiguous or in groups of 3+ digits separated by single spaces or dashes,
  that pass the Luhn check (every real card number does). Inside a longer run of groups, every
  13-19-digit stretch of consecutive groups is checked, so a card followed by a CVV or preceded
  by another number is still caught. Groups of 1-2 digits never belong to a card (lists of
  small numbers, dates like 2026-12-07). 13-19-digit runs that fail the Luhn check are KEPT:
  they cannot be a valid card, and are usually timestamps in ms or order ids; the price is that
  a mistyped card number is not masked. About 1 in 10 random 13-19-digit numbers passes Luhn
  and is masked even though it is no card (so is, as often, a list like "2019 2020 2021 2022").
- phone: international `+CC ...` (7-15 digits in all, groups separated by a space, dot or dash,
  `(0)` trunk prefix allowed: `+44 (0)20 7946 0958`), and North American `(xxx) xxx-xxxx`,
  `xxx-xxx-xxxx`, `xxx.xxx.xxxx`, `xxx xxx xxxx` (optionally after `1-`). Bare digit runs are
  never phones (a 10-digit run is as likely a Unix time), nor is a local `xxx-xxxx`.
Never masked: numbers with fewer than 7 digits, years, prices, counts like 3,000 and
dates like 2026-12-07.
"""

import json
import re

EMAIL, PHONE, CARD = "[EMAIL]", "[PHONE]", "[CARD]"

# RFC 5322 also allows / = ? & { | } ` in a local part; few addresses use them, while URLs, query
# strings and code around an address do: a local part is a run of the usual characters or, when
# nothing else is there, of these ("?to=bob@x.org" masks bob@x.org; "=@x.org" is masked whole).
_LOCAL_CHARS, _RARE_CHARS = r"A-Za-z0-9!#$%'*+^_~.\-", r"/=?&{|}`"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
# The lookbehinds let a match start only where a run of local-part characters starts: without
# them a long '@'-less run (a base64 blob) is rescanned from every position, quadratic time.
_EMAIL_RE = re.compile(
  rf"(?:(?<![{_LOCAL_CHARS}])[{_LOCAL_CHARS}]+|(?<![{_RARE_CHARS}])[{_RARE_CHARS}]+)"
  rf"@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9\-]*[A-Za-z0-9])?")

# A maximal run of digit groups joined by single spaces or dashes (one way to parse each run).
_DIGIT_RUN_RE = re.compile(r"(?<![0-9])[0-9]+(?:[ \-][0-9]+)*")
_CARD_MIN, _CARD_MAX, _CARD_MIN_GROUP = 13, 19, 3

# +CC then groups: "(digits)", digits right after ")", or separator + digits: one parse, linear.
_INTL_PHONE_RE = re.compile(
  r"(?<![A-Za-z0-9)])\+[0-9]+(?:[ .\-]?\([0-9]+\)|(?<=\))[0-9]+|[ .\-][0-9]+)*")
_INTL_GROUP_RE = re.compile(r"[ .\-]?\(?[0-9]+\)?")
_PHONE_MIN, _PHONE_MAX = 7, 15  # E.164 allows at most 15 digits with the country code
_NANP_PHONE_RE = re.compile(
  r"(?<![0-9+])(?:1[ .\-])?(?:\([0-9]{3}\)[ .\-]?|[0-9]{3}[ .\-])[0-9]{3}[ .\-][0-9]{4}(?![0-9])")


def luhn_valid(digits: str) -> bool:
  """The Luhn (mod 10) check every payment card number passes."""
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = ord(ch) - 48
    if i % 2:
      d = d * 2 - 9 if d > 4 else d * 2
    total += d
  return total % 10 == 0


def _card_spans(run: str, offset: int) -> list[tuple[int, int]]:
  """Spans (in the text) of the Luhn-valid 13-19-digit stretches of consecutive 3+-digit groups
  of one digit run. All of them, merged: picking one could pick a wrong window and leave part
  of the real card behind."""
  groups = [(m.start() + offset, m.end() + offset, m.group())
            for m in re.finditer(r"[0-9]+", run)]
  spans = []
  for i in range(len(groups)):
    digits = ""
    for j in range(i, len(groups)):
      if len(groups[j][2]) < _CARD_MIN_GROUP:
        break
      digits += groups[j][2]
      if len(digits) > _CARD_MAX:
        break
      if len(digits) >= _CARD_MIN and luhn_valid(digits):
        spans.append((groups[i][0], groups[j][1]))
  merged: list[tuple[int, int]] = []
  for start, end in sorted(spans):
    if merged and start <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
    else:
      merged.append((start, end))
  return merged


def _mask_cards(text: str) -> str:
  out, last = [], 0
  for m in _DIGIT_RUN_RE.finditer(text):
    if sum(ch.isdigit() for ch in m.group()) < _CARD_MIN:
      continue
    for start, end in _card_spans(m.group(), m.start()):
      out += [text[last:start], CARD]
      last = end
  out.append(text[last:])
  return "".join(out)


def _mask_intl_phone(m: re.Match) -> str:
  # Trailing groups past 15 digits belong to something else (a year, a count): keep them and
  # mask the phone in front, rather than leave a 16-digit "phone" unmasked altogether.
  head = re.match(r"\+[0-9]+", m.group())
  digits, end = len(head.group()) - 1, head.end()
  if digits > _PHONE_MAX:
    return m.group()
  for g in _INTL_GROUP_RE.finditer(m.group(), head.end()):
    n = sum(ch.isdigit() for ch in g.group())
    if digits + n > _PHONE_MAX:
      break
    digits, end = digits + n, g.end()
  if digits < _PHONE_MIN:
    return m.group()
  return PHONE + m.group()[end:]


def redact(text: str) -> str:
  """`text` with e-mail addresses, card numbers and phone numbers masked (module docstring).

  E-mails first (their local parts may hold digits), then cards (a card's groups could
  otherwise be read as a phone number, leaving the rest of the card behind), then phones."""
  text = _EMAIL_RE.sub(EMAIL, text)
  text = _mask_cards(text)
  text = _INTL_PHONE_RE.sub(_mask_intl_phone, text)
  return _NANP_PHONE_RE.sub(PHONE, text)


_MAX_FIELDS, _MAX_NAME = 32, 64


def _redact_value(value):
  """A JSON value with every string (keys too) redacted; integers that read as a card or a
  phone number become the tag, other numbers, booleans and null stay."""
  if isinstance(value, str):
    return redact(value)
  if isinstance(value, bool) or value is None or isinstance(value, float):
    return value
  if isinstance(value, int):
    masked = redact(str(value))
    return value if masked == str(value) else masked
  if isinstance(value, dict):
    return {redact(str(k)): _redact_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_redact_value(v) for v in value]
  return redact(str(value))


def _shape(value) -> str:
  """A field's type and size, not its content: str[52], list[3], dict[2], int."""
  if isinstance(value, (str, list, tuple, dict)):
    kind = {str: "str", list: "list", tuple: "list", dict: "dict"}[type(value)]
    return f"{kind}[{len(value)}]"
  return "null" if value is None else type(value).__name__


def _dumps(body) -> str:
  return json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)


def describe_request(path: str, body: dict | None, *, log_bodies: bool,
                     redact_bodies: bool) -> str:
  """The line the server logs about a request.

  By default: the path, the body's size in bytes (compact UTF-8 JSON) and its top-level field
  names with their types and sizes, e.g. `/v1/completions bytes=61 fields=model:str[4],
  prompt:str[40],max_tokens:int`; no content. With `log_bodies`, the body itself as JSON instead
  of the field list, every string in it (keys too) redacted when `redact_bodies`. The path is
  always redacted (a route never holds personal data; a client-made-up path might). Field names
  are the client's too: they are redacted, cut to 64 characters, and at most 32 are listed.
  """
  line = redact(path)
  if body is None:
    return f"{line} bytes=0"
  size = len(_dumps(body).encode("utf-8"))
  if log_bodies:
    shown = _redact_value(body) if redact_bodies else body
    return f"{line} bytes={size} body={_dumps(shown)}"
  if not isinstance(body, dict):
    return f"{line} bytes={size} body_type={_shape(body)}"
  fields = [f"{redact(str(k))[:_MAX_NAME]}:{_shape(v)}"
            for k, v in list(body.items())[:_MAX_FIELDS]]
  if len(body) > _MAX_FIELDS:
    fields.append(f"+{len(body) - _MAX_FIELDS} more")
  return f"{line} bytes={size} fields={','.join(fields)}"
