"""The OpenAI chat completions API as the server speaks it: requests in, responses and stream chunks out.

Requests allow fields we do not model (clients send user, metadata, logit_bias: null and the
like); the fields that would change the answer and that we do not implement are refused in
serving.py rather than ignored.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- requests ---------------------------------------------------------------------------------------


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ImageURL(Lenient):
    url: str
    detail: str | None = None


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | str


class InputAudio(Lenient):
    data: str  # base64
    format: str = "wav"


class AudioPart(Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class ChatCompletionRequest(Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 or -1: off
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch.Generator takes
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    # extensions the AutoGLM clients send through extra_body
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_reasoning: bool | None = None
    max_reasoning_steps: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None  # vLLM's: generate max_tokens whatever the model says (benchmarks)
    exit_layer: int | None = None  # dyngraph's: this request's exit depth (needs runtime.policy.request_override)
    speculative: bool | None = None  # dyngraph's: self-speculation on or off for this request (default: runtime.speculation.enabled)
    draft_exit: int | None = None  # dyngraph's: the exit that drafts when it speculates (default: runtime.speculation.draft_exit)


# --- responses ----------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "degraded", "draining"]
    in_flight: int | None = None  # draining: requests still generating
    degraded_paths: dict[str, str] | None = None  # degraded: path -> why it cannot run (an engine file failed verification)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dyngraph"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class DyngraphInfo(BaseModel):
    """How the request ran: the benchmark reads it from every response."""

    path: str
    exit_layer: int
    modalities: list[str]
    engines: list[str]
    devices: dict[str, str]
    mode: str
    replica: str | None = Field(default=None, exclude_if=lambda v: v is None)  # behind Ray Serve: which replica answered
    # when it speculated: tokens drafted, drafts accepted, verifications and the tokens they yielded
    speculation: dict[str, int] | None = Field(default=None, exclude_if=lambda v: v is None)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    dyngraph: DyngraphInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    dyngraph: DyngraphInfo | None = None
