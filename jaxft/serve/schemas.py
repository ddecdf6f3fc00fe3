"""Request bodies of the OpenAI-compatible routes, validated field by field (pydantic): a bad
field is a 400 whose error names it. Unknown fields are refused rather than ignored (a client
asking for logprobs or penalties this server does not compute should hear so)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_STRICT = ConfigDict(extra="forbid")


class StreamOptions(BaseModel):
  model_config = _STRICT
  include_usage: bool = False


class Sampling(BaseModel):
  """The fields both generation routes share (OpenAI's names and defaults; top_k as vLLM)."""
  model_config = _STRICT
  model: str | None = None
  max_tokens: int | None = Field(None, ge=1, description="default: 16 (completions), the "
                                 "rest of the context (chat)")
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0, lt=2**31)
  n: int = Field(1, ge=1)
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  seed: int | None = Field(None, ge=0, lt=2**32)
  user: str | None = None

  @field_validator("stop")
  @classmethod
  def _stops(cls, value):
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4 or any(not s for s in stops):
      raise ValueError("give at most 4 non-empty stop strings")
    return stops


class CompletionRequest(Sampling):
  prompt: str | list[str]

  @field_validator("prompt")
  @classmethod
  def _prompts(cls, value):
    prompts = [value] if isinstance(value, str) else value
    if not prompts:
      raise ValueError("give a prompt string or a non-empty list of them")
    return prompts


class Message(BaseModel):
  model_config = _STRICT
  role: Literal["system", "user", "assistant"]
  content: str
  name: str | None = None


class ChatRequest(Sampling):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for "
                                            "max_tokens")
