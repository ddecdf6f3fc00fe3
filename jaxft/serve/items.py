"""Checks of served request items, before they are queued: a bad item fails its own request at
once (HTTP 400), with a message naming the item and the field, and never reaches a batch it
would fail for every other request in it."""

from collections.abc import Sequence


def check_items(items, fields: Sequence[str], endpoint: str) -> list[dict]:
  """`items` as a list of dicts that each hold every field in `fields` as a non-empty string
  (other keys are kept; the caller reads what it knows). Raises ValueError naming
  items[i].field and what to give instead."""
  need = ", ".join(f'"{f}"' for f in fields)
  if not isinstance(items, (list, tuple)):
    raise ValueError(f"{endpoint}: the inputs must be a list of objects with {need}, not "
                     f"{type(items).__name__}")
  if not items:
    raise ValueError(f"{endpoint}: no inputs; give at least one object with {need}")
  out = []
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise ValueError(f"{endpoint}: items[{i}] is a {type(item).__name__}, not an object; "
                       f"give objects with {need}")
    for field in fields:
      value = item.get(field)
      if value is None:
        raise ValueError(f"{endpoint}: items[{i}] lacks the field {field!r} (it has "
                         f"{sorted(item)}); give objects with {need}")
      if not isinstance(value, str):
        raise ValueError(f"{endpoint}: items[{i}].{field} is a {type(value).__name__}; it must "
                         "be a string")
      if not value.strip():
        raise ValueError(f"{endpoint}: items[{i}].{field} is empty; give non-empty text")
    out.append(item)
  return out
