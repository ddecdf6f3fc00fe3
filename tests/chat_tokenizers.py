"""Fixtures of tests/test_chat.py: chat templates, conversations and locally built tokenizers.

Three tokenizers are trained here on a few hundred lines of the embedded Shakespeare, each with
the special tokens and the shape of a real family's tokenizer (Llama 3: byte-level BPE with its
split regex and a BOS post-processor; Qwen 2.5: byte-level BPE, NFC, trimmed offsets; Gemma:
spaces as "▁", no byte level), and saved as transformers tokenizer directories with a copy of
the family's chat template. Nothing is downloaded.
"""

import json
import lzma
import os

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

import jaxft.data

# Meta-Llama-3-8B-Instruct's template, as in its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    r"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    r"trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    r"{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct's ChatML template: a default system prompt, tools as JSON, tool calls.
QWEN_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (a verbatim copy)

# Gemma 3's: the system prompt joins the first user turn, roles must alternate, 'model' speaks.
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# DeepSeek-R1's habit: earlier assistant turns lose their reasoning, so rendering is not
# incremental and the assistant's tokens cannot be found by prefixes.
DROPS_REASONING_TEMPLATE = (
    r"{{ bos_token }}{% for m in messages %}{% set content = m['content'] %}"
    r"{% if m['role'] == 'assistant' and not loop.last %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + content + '<|eot_id|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CONVERSATIONS = {
    "one turn": [
        {"role": "user", "content": "What say you, good Horatio?"},
        {"role": "assistant", "content": "Thou art well met, my lord."},
    ],
    "system": [
        {"role": "system", "content": "You speak as a player in 1600."},
        {"role": "user", "content": "Café — 東京 🙂, 12345 ducats?"},
        {"role": "assistant", "content": "  A fair price: 12345 ducats, 東京 and all 🙂.\n"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Answer in verse."},
        {"role": "user", "content": "Who is there?"},
        {"role": "assistant", "content": "Nay, answer me:\n\nstand, and unfold yourself."},
        {"role": "user", "content": "Long live the king!"},
        {"role": "assistant", "content": "Bernardo? He."},
        {"role": "user", "content": "And the night?"},
    ],
    "multi-turn, no system": [
        {"role": "user", "content": "To be, or not to be?"},
        {"role": "assistant", "content": "That is the question."},
        {"role": "user", "content": "Whether 'tis nobler in the mind"},
        {"role": "assistant", "content": "To suffer the slings and arrows\tof fortune."},
    ],
}

STYLES = {
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"],
        roles={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        generation_eos=["<|end_of_text|>", "<|eot_id|>"], config_eos="<|end_of_text|>",
        turn_end="<|eot_id|>", trims=True),
    "qwen": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        generation_eos=["<|im_end|>", "<|endoftext|>"], config_eos=None,
        turn_end="<|im_end|>\n", trims=False),
    "gemma": dict(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        roles={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
               "unk_token": "<unk>"},
        generation_eos=["<eos>", "<end_of_turn>"], config_eos="<eos>",
        turn_end="<end_of_turn>\n", trims=True),
}
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "qwen": QWEN_TEMPLATE, "gemma": GEMMA_TEMPLATE}


def _corpus() -> list[str]:
  # The Shakespeare corpus embedded in the repository (no package needed).
  path = os.path.join(os.path.dirname(jaxft.data.__file__), "corpus",
                      "shakespeare_validation.jsonl.xz")
  with lzma.open(path, "rt", encoding="utf-8") as f:
    text = "\n".join(json.loads(line)["text"] for line in f)
  lines = [line for line in text.splitlines() if line.strip()][200:700]
  # The conversations' own characters (東京, 🙂) must be in a non-byte-level alphabet.
  return lines + [m["content"] for conv in CONVERSATIONS.values() for m in conv]


def _backend(style: str, specials: list[str]) -> tokenizers.Tokenizer:
  if style == "gemma":
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    alphabet = []
  else:
    tok = tokenizers.Tokenizer(models.BPE())
    split = LLAMA3_SPLIT if style == "llama3" else QWEN_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(_corpus(), trainer)
  if style == "llama3":  # BOS with add_special_tokens=True, which chat encoding must not add
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
  elif style == "qwen":
    tok.normalizer = normalizers.NFC()
    # Trimmed offsets (GPT-2's setting) give whitespace tokens empty character ranges.
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
  return tok


def write_style(directory: str, style: str) -> str:
  """A transformers tokenizer directory; the template sits where each family keeps it."""
  s = STYLES[style]
  tok = _backend(style, s["specials"])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
            **s["roles"]}
  if style == "llama3":  # the older list form, whose "default" transformers uses
    config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                               {"name": "default", "template": LLAMA3_TEMPLATE}]
  elif style == "qwen":
    config["chat_template"] = QWEN_TEMPLATE
  else:  # transformers 5's chat_template.jinja
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(GEMMA_TEMPLATE)
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tok.token_to_id(t) for t in s["generation_eos"]]}, f)
  if s["config_eos"]:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump({"eos_token_id": tok.token_to_id(s["config_eos"])}, f)
  return directory
