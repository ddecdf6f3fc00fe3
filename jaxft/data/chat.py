"""Chat templates: render a tokenizer's Jinja template exactly as transformers'
`apply_chat_template` does, check messages, and tokenize a conversation with a mask of the tokens
the assistant says (what supervised fine-tuning puts its loss on).

The Jinja environment copies transformers 5's (utils/chat_template_utils.py): a sandbox whose
objects templates cannot mutate, trim_blocks + lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML, guarded `dict` and `namespace`. The same
string must come out of both, or a model fine-tuned here sees other text than it will be served.
"""

import datetime
import functools
import json
import weakref

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from jaxft.data.errors import BadInputError

ROLES = ("system", "user", "assistant", "tool")
# Names a message's reasoning goes by; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError, jinja2.TemplateError):
  """A template that fails to render (its own raise_exception, a syntax error, an undefined
  name): a ValueError for jaxft's callers, a TemplateError like transformers raises."""

  def __init__(self, message: str):
    ValueError.__init__(self, message)

  @property
  def message(self) -> str:  # jinja2.TemplateError's accessor
    return str(self)


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: transformers' marker of assistant text. Templates
  that use it must parse; its body renders unchanged (encode_conversation does not need it)."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _TemplateDict:
  """`dict(...)` in templates without the dict type itself (its attributes reach Python)."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """Jinja's namespace, refusing underscore names (a way to CPython internals)."""

  def __init__(*args, **kwargs):  # noqa: N805 (Jinja's signature trick, so `self=` is a name)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got "
          f"{name!r}. Please rename the attribute.")


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     dict=_TemplateDict(), namespace=_Namespace)
  return env.from_string(template)


def _prepare(messages: list[dict]) -> list[dict]:
  """Messages as transformers hands them to the template: keys whose value is None dropped (many
  templates print "None" for them, but handle a missing key), reasoning under every name."""
  out = []
  for message in messages:
    if not isinstance(message, dict):
      raise TypeError(f"chat messages must be dicts, got {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           special_tokens: dict[str, str] | None = None, **kwargs) -> str:
  """The text apply_chat_template(messages, tokenize=False) gives. `special_tokens` are the
  tokenizer's role -> text ("bos_token": "<bos>", ...); `kwargs` (tools, documents,
  enable_thinking, ...) reach the template as variables and win over special tokens."""
  variables = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
  try:
    return _compile(template).render(messages=_prepare(messages),
                                     add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from e
  except jinja2.TemplateError as e:  # the template's raise_exception message, kept verbatim
    raise ChatTemplateError(str(e)) from e


def validate_messages(messages, where: str) -> None:
  """Raises BadInputError (a ValueError) naming `where` ("chats.jsonl:12") and the field, for
  anything but a non-empty list of {"role": one of ROLES, "content": a string}."""
  if not isinstance(messages, list) or not messages:
    raise BadInputError(f"{where}: messages is {type(messages).__name__} {messages!r:.80}; give a "
                        'non-empty list of {"role", "content"} objects')
  for i, message in enumerate(messages):
    field = f"messages[{i}]"
    if not isinstance(message, dict):
      raise BadInputError(f"{where}: {field} is {message!r:.80}, not an object with role and "
                          "content")
    for key in ("role", "content"):
      if key not in message:
        raise BadInputError(f"{where}: {field} has no {key!r} (it has {sorted(message)})")
    if message["role"] not in ROLES:
      raise BadInputError(f"{where}: {field}.role is {message['role']!r}; use one of "
                          f"{', '.join(ROLES)}")
    if not isinstance(message["content"], str):
      raise BadInputError(f"{where}: {field}.content is {type(message['content']).__name__} "
                          f"{message['content']!r:.80}; give a string")


# Per tokenizer: a copy of its backend without a post-processor, whose offsets are untrimmed.
_OFFSET_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _offset_backend(tokenizer) -> tokenizers.Tokenizer:
  """A ByteLevel post-processor with trim_offsets (GPT-2's) shrinks a token's character range
  to exclude its spaces, down to nothing for a token that is all whitespace. Without special
  tokens added, the post-processor changes no ids, so a copy without one gives the same ids and
  offsets that cover every character."""
  backend = _OFFSET_BACKENDS.get(tokenizer)
  if backend is None:
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = None
    backend.no_padding()
    backend.no_truncation()
    _OFFSET_BACKENDS[tokenizer] = backend
  return backend


def _first_difference(a: str, b: str) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _not_incremental(i: int, shorter: tuple[str, str], longer: tuple[str, str]) -> ValueError:
  """The error for a template whose rendering of a conversation's start is not the start of its
  rendering of the whole (e.g. one that drops earlier turns' reasoning): (name, text) pairs."""
  (short_name, short), (long_name, long) = shorter, longer
  at = _first_difference(short, long)
  return ValueError(
      f"the chat template does not render conversations incrementally: {short_name} is not a "
      f"prefix of {long_name} (from character {at}: {short[at:at + 60]!r} vs "
      f"{long[at:at + 60]!r}), so the tokens of assistant message {i} cannot be located; train "
      "on every token with config.sft.loss_on='all', or fix the template")


def encode_conversation(tokenizer, messages: list[dict], *, template: str | None = None,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
  """Token ids of the rendered conversation (as apply_chat_template(tokenize=True): no special
  tokens added, those the template writes become their ids) and, per token, whether it is text
  of an assistant message: its content and whatever the template writes after it up to the next
  message (the end-of-turn token, so that a model learns to stop), not the header before it.

  An assistant message's text is found without the template's help: rendering messages[:i] with
  the generation prompt must give a prefix of rendering messages[:i + 1], which must be a prefix
  of the whole conversation; the characters between are the assistant's, and a token is the
  assistant's if its character range overlaps them (transformers' rule for its masks).
  """
  if template is None:
    template = tokenizer.chat_template
    if template is None:
      raise ValueError(f"tokenizer {tokenizer.source or 'gpt2 (built-in)'} has no chat template; "
                       "add a chat_template to its tokenizer_config.json (or a "
                       "chat_template.jinja next to it), or pass one")
  special = dict(tokenizer.special)

  def text(msgs, prompt):
    return render(template, msgs, add_generation_prompt=prompt, special_tokens=special)

  full = text(messages, add_generation_prompt)
  spans = []
  for i, message in enumerate(messages):
    if message.get("role") != "assistant":
      continue
    before, through = text(messages[:i], True), text(messages[:i + 1], False)
    named = f"the rendering of messages[:{i + 1}]"
    if not through.startswith(before):
      raise _not_incremental(i, (f"the rendering of messages[:{i}] with the generation prompt",
                                 before), (named, through))
    if not full.startswith(through):
      raise _not_incremental(i, (named, through), ("that of the whole conversation", full))
    spans.append((len(before), len(through)))

  in_span = bytearray(len(full) + 1)  # per character: 1 inside an assistant message's text
  for start, end in spans:
    in_span[start:end] = b"\x01" * (end - start)
  encoding = _offset_backend(tokenizer).encode(full, add_special_tokens=False)
  # Offsets are character ranges of `full`. A token with an empty one (a normalizer gave all
  # its characters to a neighbour) goes with the character where it stands.
  mask = [bool(any(in_span[s:e]) if e > s else in_span[s]) for s, e in encoding.offsets]
  return list(encoding.ids), mask
