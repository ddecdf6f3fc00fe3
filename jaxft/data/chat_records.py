"""Readers of instruction-tuning (SFT) and preference (DPO) JSONL files, one record per line.

SFT records, either form:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}          plain text, no chat template
    {"prompt": [messages], "completion": [messages]} conversational: prompt + completion
Preference records (DPO):
    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"prompt": [messages], "chosen": [messages] | "...", "rejected": [messages] | "..."}

Every record is checked where it is read: a bad one is an error naming file:line, the field
and the fix. Records come back normalised: {"messages": [...]} or {"prompt", "completion"}
strings for SFT; {"prompt", "chosen", "rejected"} with chosen / rejected as assistant message
lists when the prompt is a message list, else all three strings.
"""

from jaxft.data import textio
from jaxft.data.errors import bad_input
from jaxft.data.textio import UTF8, Encoding, json_type, json_value

ROLES = ("system", "user", "assistant")
_ONE_PER_LINE = ".jsonl files need one JSON object per line"


def _records(path: str, encoding: Encoding):
  for n, line in textio.read_lines(path, encoding):
    if not line.strip():
      continue
    record = json_value(line, path, n, _ONE_PER_LINE)
    if not isinstance(record, dict):
      raise bad_input(path, n, f"is a JSON {json_type(record)}, not an object", _ONE_PER_LINE)
    yield n, record


def check_messages(messages, path: str, line: int | None, field: str = "messages") -> list:
  """A list of {"role", "content"} objects with known roles and string contents."""
  if not isinstance(messages, list) or not messages:
    raise bad_input(path, line, f"has a {field!r} that is "
                    f"{'an empty list' if messages == [] else 'a JSON ' + json_type(messages)}",
                    'give a non-empty list of {"role": ..., "content": ...} objects')
  for i, m in enumerate(messages):
    at = f"{field}[{i}]"
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise bad_input(path, line, f"has {at} without a role and a content",
                      'write each message as {"role": "user", "content": "..."}')
    if m["role"] not in ROLES:
      raise bad_input(path, line, f"has {at}.role={m['role']!r}", f"use one of {ROLES}")
    if not isinstance(m["content"], str):
      raise bad_input(path, line, f"has {at}.content that is a JSON "
                      f"{json_type(m['content'])}", "give the content as a string")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text(record: dict, key: str, path: str, line: int) -> str:
  if not isinstance(record[key], str):
    raise bad_input(path, line, f"has a {key!r} that is a JSON {json_type(record[key])}",
                    f"give {key!r} as a string (or prompt and {key} as message lists)")
  return record[key]


def _require(record: dict, keys: tuple, path: str, line: int, forms: str) -> None:
  missing = [k for k in keys if k not in record]
  if missing:
    raise bad_input(path, line, f"has no {' / '.join(repr(k) for k in missing)} field (its "
                    f"fields are {sorted(record)})", f"write records as {forms}")


_SFT_FORMS = '{"messages": [...]} or {"prompt": ..., "completion": ...}'
_DPO_FORMS = '{"prompt": ..., "chosen": ..., "rejected": ...}'


def read_chats(path: str, encoding: Encoding = UTF8) -> list[dict]:
  out = []
  for n, record in _records(path, encoding):
    if "messages" in record:
      messages = check_messages(record["messages"], path, n)
      if not any(m["role"] == "assistant" for m in messages):
        raise bad_input(path, n, "has no assistant message, so nothing to learn from",
                        "add the assistant's answer")
      out.append({"messages": messages})
      continue
    _require(record, ("prompt", "completion"), path, n, _SFT_FORMS)
    if isinstance(record["prompt"], list):
      prompt = check_messages(record["prompt"], path, n, "prompt")
      completion = check_messages(record["completion"], path, n, "completion")
      out.append({"messages": prompt + completion})
    else:
      out.append({"prompt": _text(record, "prompt", path, n),
                  "completion": _text(record, "completion", path, n)})
  return out


def read_preferences(path: str, encoding: Encoding = UTF8) -> list[dict]:
  out = []
  for n, record in _records(path, encoding):
    _require(record, ("prompt", "chosen", "rejected"), path, n, _DPO_FORMS)
    if isinstance(record["prompt"], list):
      prompt = check_messages(record["prompt"], path, n, "prompt")
      answers = {}
      for key in ("chosen", "rejected"):
        value = record[key]
        answers[key] = ([{"role": "assistant", "content": value}] if isinstance(value, str)
                        else check_messages(value, path, n, key))
      out.append({"prompt": prompt, **answers})
    else:
      out.append({k: _text(record, k, path, n) for k in ("prompt", "chosen", "rejected")})
  return out
