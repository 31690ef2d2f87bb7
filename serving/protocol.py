"""The OpenAI chat completions API as the server speaks it: requests in, responses and stream chunks out.

Requests allow fields we do not model (clients send user, metadata, store and the like); the
fields that would change the answer and that we do not implement are refused in serving/chat.py
(`REFUSED`) rather than ignored.
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


class FunctionCall(Lenient):
    name: str
    arguments: str  # JSON text


class ToolCall(Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back in a multi-turn conversation
    tool_call_id: str | None = None  # a tool's result: the call it answers


class FunctionDefinition(Lenient):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; none: no arguments
    strict: bool | None = None


class Tool(Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Lenient):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


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
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's extension; 1: off. Bounded: a penalty near 0 divides logits past float32's range (inf, then NaN probabilities)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
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


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys/values came from the prefix cache (runtime.prefix_cache)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
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
    # where the time to first token went, ms per part in order (runtime.requests.Timeline); they add up to it
    timeline: dict[str, float] = Field(default_factory=dict)


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    dyngraph: DyngraphInfo


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    dyngraph: DyngraphInfo | None = None
