"""Chat templates and decoder-family tokenizers, proven equal to transformers' apply_chat_template
(the tokenizers and templates: tests/chat_tokenizers.py; nothing is downloaded)."""

import json
import os
import re

import jinja2
import pytest

from jaxft.data import chat
from jaxft.data.tokenizer import load_tokenizer
from tests.chat_tokenizers import (
  CONVERSATIONS,
  DROPS_REASONING_TEMPLATE,
  GEMMA_TEMPLATE,
  STYLES,
  TEMPLATES,
  write_style,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat_tokenizers")
  return {style: write_style(str(root / style), style) for style in STYLES}


@pytest.fixture(scope="module")
def ours(dirs):
  return {style: load_tokenizer(d) for style, d in dirs.items()}


@pytest.fixture(scope="module")
def theirs(dirs):
  return {style: transformers.AutoTokenizer.from_pretrained(d) for style, d in dirs.items()}


def _cases(style):
  """(name, messages, add_generation_prompt) the family's template accepts."""
  for name, messages in CONVERSATIONS.items():
    for prompt in (False, True):
      yield f"{name}, add_generation_prompt={prompt}", messages, prompt


@pytest.mark.parametrize("style", STYLES)
def test_rendering_and_ids_equal_transformers(style, ours, theirs):
  tok, ref = ours[style], theirs[style]
  assert tok.chat_template == TEMPLATES[style]
  for case, messages, prompt in _cases(style):
    text = chat.render(tok.chat_template, messages, add_generation_prompt=prompt,
                       special_tokens=tok.special)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=prompt,
                                           tokenize=False), case
    ids, _ = chat.encode_conversation(tok, messages, add_generation_prompt=prompt)
    want = ref.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False)
    assert ids == want, case
    # Every special token the template writes is one id, never its characters as text.
    end = STYLES[style]["turn_end"].strip()
    assert ids.count(tok.backend.token_to_id(end)) == text.count(end) > 0, case


@pytest.mark.parametrize("style", STYLES)
def test_assistant_mask_is_the_replies_and_their_end_of_turn(style, ours, theirs):
  tok, s = ours[style], STYLES[style]
  for case, messages, prompt in _cases(style):
    ids, mask = chat.encode_conversation(tok, messages, add_generation_prompt=prompt)
    assert len(mask) == len(ids)
    runs, run = [], []
    for i, m in zip(ids, mask):
      if m:
        run.append(i)
      elif run:
        runs, run = runs + [run], []
    runs += [run] if run else []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    want = [(r.strip() if s["trims"] else r) + s["turn_end"] for r in replies]
    assert [tok.decode(r) for r in runs] == want, case
    # What is left is the prompt: system, user turns and every header, generation prompt last.
    rest = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert all(m["content"].strip() in rest for m in messages if m["role"] == "user"), case
    if prompt:
      assert not mask[-1], case


def test_templates_exceptions_surface_with_their_message(ours, theirs):
  bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
  with pytest.raises(ValueError, match="Conversation roles must alternate") as raised:
    chat.render(GEMMA_TEMPLATE, bad, special_tokens=ours["gemma"].special)
  assert isinstance(raised.value, jinja2.TemplateError)  # what transformers raises
  with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
    theirs["gemma"].apply_chat_template(bad, tokenize=False)
  with pytest.raises(ValueError, match="Conversation roles must alternate"):
    chat.encode_conversation(ours["gemma"], bad)
  with pytest.raises(ValueError, match="line 2"):
    chat.render("ok\n{% if %}", bad)


def test_tools_render_as_transformers_with_json_unescaped(ours, theirs):
  tools = [{"type": "function", "function": {
      "name": "weigh", "description": "Weighs <gold> & \"silver\" in ducats, café-style",
      "parameters": {"type": "object", "properties": {"what": {"type": "string"}}}}}]
  messages = CONVERSATIONS["system"] + [
      {"role": "assistant", "content": None, "tool_calls": [
          {"type": "function", "function": {"name": "weigh", "arguments": {"what": "東京"}}}]},
      {"role": "tool", "content": "3 stone"}]
  tok, ref = ours["qwen"], theirs["qwen"]
  text = chat.render(tok.chat_template, messages, add_generation_prompt=True,
                     special_tokens=tok.special, tools=tools)
  assert text == ref.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                         tokenize=False)
  assert '"Weighs <gold> & \\"silver\\" in ducats, café-style"' in text  # no HTML escapes
  with pytest.raises(ValueError, match="underscore"):
    chat.render("{% set ns = namespace(_x=1) %}", messages)


# Block tags on lines of their own (trim_blocks, lstrip_blocks), loop controls, namespace, dict,
# tojson's options, strftime_now, a None field (dropped), reasoning under another name (aliased),
# tools and documents (None when not given).
FEATURES_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% if ns.n >= 3 %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ m.role }}] {{ m.content }} / {{ m.reasoning_content }}
  {{ m | tojson(indent=2, sort_keys=True) }}
{% endfor %}
{{ ns.n }} {{ bos_token }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') }} {{ custom }}
{{ tools is none }} {{ documents is none }}
"""


def test_jinja_features_and_variables_render_as_transformers(ours, theirs):
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Weigh it."},
      {"role": "assistant", "content": "3 stone", "reasoning": "Gold is heavy."},
      {"role": "user", "content": None},
      {"role": "assistant", "content": "never shown"},
  ]
  tok, ref = ours["qwen"], theirs["qwen"]  # Qwen's special tokens have no bos_token
  for kwargs in ({}, {"bos_token": "B", "custom": "x"}):  # kwargs win over special tokens
    text = chat.render(FEATURES_TEMPLATE, messages, special_tokens=tok.special, **kwargs)
    assert text == ref.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE,
                                           tokenize=False, **kwargs)
  assert text.startswith("  [user] Weigh it. / \n  {\n")  # no blank lines from block tags
  assert "  [assistant] 3 stone / Gold is heavy.\n" in text
  assert "never shown" not in text and "None" not in text
  # Templates test `tools is not none`: unset, they are None, not undefined.
  assert re.search(r'\n3 B \{"a": 1\} \d{4} x\nTrue True$', text)  # no final newline (Jinja)


def test_a_template_that_rewrites_history_is_refused_with_the_way_out(ours):
  messages = [
      {"role": "user", "content": "Think first."},
      {"role": "assistant", "content": "<think>Hmm.</think>Done."},
      {"role": "user", "content": "Again."},
      {"role": "assistant", "content": "<think>Hm.</think>Once more."},
  ]
  with pytest.raises(ValueError, match=r"not a prefix.*assistant message 1.*loss_on='all'"):
    chat.encode_conversation(ours["llama3"], messages, template=DROPS_REASONING_TEMPLATE)
  # The last turn alone is rendered whole: a one-turn conversation has nothing to rewrite.
  ids, mask = chat.encode_conversation(ours["llama3"], messages[:2],
                                       template=DROPS_REASONING_TEMPLATE)
  assert ours["llama3"].decode([i for i, m in zip(ids, mask) if m]) == (
      "<think>Hmm.</think>Done.<|eot_id|>")


def test_a_tokenizer_without_a_template_says_how_to_add_one(tmp_path, ours):
  tok = ours["gemma"]
  tok.backend.save(str(tmp_path / "tokenizer.json"))
  bare = load_tokenizer(str(tmp_path))
  assert bare.chat_template is None
  with pytest.raises(ValueError, match=f"{tmp_path}.*chat_template.*pass one"):
    chat.encode_conversation(bare, CONVERSATIONS["one turn"])
  ids, _ = chat.encode_conversation(bare, CONVERSATIONS["one turn"], template=GEMMA_TEMPLATE)
  assert ids == chat.encode_conversation(tok, CONVERSATIONS["one turn"])[0][1:]  # no <bos>


def test_eos_ids_gather_every_stop_token(ours):
  for style, tok in ours.items():
    s = STYLES[style]
    stops = [s["roles"]["eos_token"], *s["generation_eos"], *filter(None, [s["config_eos"]])]
    ids = [tok.backend.token_to_id(t) for t in stops]
    assert tok.eos_ids == tuple(dict.fromkeys(ids)), style
    assert tok.eos_id == tok.eos_ids[0] == tok.backend.token_to_id(s["roles"]["eos_token"])
  assert len(ours["llama3"].eos_ids) == 2 and len(ours["gemma"].eos_ids) == 2
  gpt2 = load_tokenizer()
  assert gpt2.eos_ids == (50256,) and gpt2.chat_template is None


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_a_saved_tokenizer_reloads_with_its_template_and_special_tokens(style, tmp_path, ours):
  tok = ours[style]
  tok.save(str(tmp_path))
  assert os.path.exists(tmp_path / "chat_template.jinja")
  with open(tmp_path / "tokenizer_config.json") as f:
    config = json.load(f)  # the source's class, not GPT-2's: not every byte-level BPE is GPT-2
  assert (config["tokenizer_class"], config["model_max_length"]) == ("PreTrainedTokenizerFast",
                                                                     4096)
  assert "chat_template" not in config  # chat_template.jinja is the one copy
  again = load_tokenizer(str(tmp_path))
  assert again.chat_template == tok.chat_template and again.special == tok.special
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  messages = CONVERSATIONS["multi-turn"]
  assert ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == (
      chat.encode_conversation(again, messages, add_generation_prompt=True)[0])
  # Saving a tokenizer without a template over it leaves no stale template behind.
  load_tokenizer().save(str(tmp_path))
  assert load_tokenizer(str(tmp_path)).chat_template is None


@pytest.mark.parametrize("messages, field", [
    ("hello", "messages is str"),
    ([], "messages is list"),
    (["hi"], "messages[0] is 'hi'"),
    ([{"content": "x"}], "messages[0] has no 'role'"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
     "messages[1].role is 'bot'; use one of system, user, assistant, tool"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
     "messages[0].content is list"),
])
def test_bad_messages_name_the_line_and_the_field(messages, field):
  with pytest.raises(ValueError) as raised:
    chat.validate_messages(messages, "chats.jsonl:12")
  assert str(raised.value).startswith("chats.jsonl:12: ") and field in str(raised.value)


def test_good_messages_pass_validation():
  for messages in CONVERSATIONS.values():
    chat.validate_messages(messages, "chats.jsonl:1")
  chat.validate_messages([{"role": "tool", "content": "3 stone", "name": "weigh"}], "x:1")
