"""The requests the HTTP API accepts, as pydantic models of OpenAI's chat-completions API.

Responses are the `openai` package's own types (built in app/api/server.py), so they have
exactly the shape every OpenAI client parses. Requests are our own models: they accept what
OpenAI documents (and vLLM's `audio_url` part), ignore fields that do not change the answer
(`user`, `metadata`...), and say clearly what is not supported.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    max_crops: int | None = Field(default=None, ge=1, le=64)  # an extension: the crop count itself


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str                     # base64
    format: str                   # "wav", "mp3", "flac", ...


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(_Request):
    url: str


class AudioURLPart(_Request):
    """vLLM's audio part: a URL (here: a data: URL) instead of inline base64."""
    type: Literal["audio_url"]
    audio_url: AudioURL


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, AudioURLPart], Field(discriminator="type")]


class FunctionCall(_Request):
    name: str
    arguments: str                # a JSON object, as text


class ToolCall(_Request):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # An extension for our own remote engine: on a system message, the tools already declared in
    # Phi-4-mini's format (a JSON list), placed in the chat template's own slot for them.
    tools: str | None = None


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JSONSchema(_Request):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampled(_Request):
    """What chat and plain completions share."""
    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)              # an extension, as llama-server's and vLLM's
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None


class ChatCompletionRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    grammar: str | None = None    # an extension, as llama-cpp-python's server: a llama.cpp GBNF grammar


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None
