"""Chat completions: from an OpenAI request to a generation request, and from engine events back
to an OpenAI response or stream, over the small `EngineClient` interface. The HTTP layer
(serving/app.py) only moves bytes; runtime/serve.py assembles the two over the runtime.

Every mistake a client can make ends here as an `APIError`: one message, the parameter it is
about, and the status OpenAI's API would give.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol
from dataclasses import dataclass, replace

import torch
from pydantic import ValidationError

from model.multimodal.audio import AudioArgs
from model.tokenizer import ChatTokenizer
from serving.config import ServerConfig
from runtime.requests import Event, Failed, Finished, GenerationRequest, QueueFull, RequestHandle, Started, Timeline
from runtime.text import Delta
from runtime.constrained import GrammarCompiler, GrammarError
from serving.media import MediaError, MediaLimits, decode_audio, decode_base64, decode_image, image_bytes
from runtime.metrics import Metrics
from serving.protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice, ChoiceLogprobs,
                              ChunkChoice, CompletionTokensDetails, DeltaFunction, DeltaMessage, DeltaToolCall, DyngraphInfo,
                              ErrorBody, ErrorResponse, ModelCard, ModelList, NamedToolChoice, PromptTokensDetails, ResponseFunctionCall,
                              ResponseMessage, ResponseToolCall, TokenLogprob, TopLogprob, Usage)
from runtime.sampling import SamplingParams
from serving.tools import Piece, ToolCallReader, grammar_for, parameters_of

log = logging.getLogger("dyngraph.serving")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
DISCONNECT_POLL_S = 0.25
UNION_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}
SURROGATES = re.compile("[\ud800-\udfff]")
# parameters of OpenAI's chat API (and vLLM's extensions) that would change the answer and that this
# server does not implement: refused with a 400 naming them unless absent or at a value that changes nothing
REFUSED: dict[str, tuple[str, tuple]] = {
    "functions": ("the deprecated `functions` are not supported: send `tools`", ()),
    "function_call": ("the deprecated `function_call` is not supported: send `tool_choice`", ()),
    "audio": ("audio output is not supported", ()),
    "modalities": ("only text output is supported", (["text"],)),
    "prediction": ("predicted outputs are not supported", ()),
    "web_search_options": ("web search is not supported", ()),
    "reasoning_effort": ("reasoning_effort is not supported: send enable_thinking", ()),
    "verbosity": ("verbosity is not supported", ()),
    "min_p": ("min_p is not supported", ()),
    "best_of": ("best_of is not supported: send n", (1,)),
    "use_beam_search": ("beam search is not supported", ()),
    "min_tokens": ("min_tokens is not supported", ()),
    "stop_token_ids": ("stop_token_ids are not supported: send stop", ()),
    "allowed_token_ids": ("allowed_token_ids are not supported: send logit_bias or response_format", ()),
    "bad_words": ("bad_words are not supported: send logit_bias", ()),
    "guided_json": ("guided_json is not supported: send response_format", ()),
    "guided_regex": ("guided_regex is not supported", ()),
    "guided_choice": ("guided_choice is not supported: send response_format with an enum schema", ()),
    "guided_grammar": ("guided_grammar is not supported", ()),
    "structured_outputs": ("structured_outputs is not supported: send response_format", ()),
    "prompt_logprobs": ("prompt_logprobs are not supported", ()),
    "logits_processors": ("logits_processors are not supported", ()),
    "echo": ("echo is not supported", ()),
    "continue_final_message": ("continue_final_message is not supported", ()),
}
HARMLESS = (None, False, 0, "", [], {})


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()


class ClientGone(Exception):
    """The client disconnected while its request waited or generated; nobody is left to answer."""


@dataclass
class Reply:
    headers: dict[str, str]
    body: dict | None = None  # a whole JSON response
    chunks: AsyncIterator[str] | None = None  # or the data lines of an SSE stream
    close: Callable[[], None] = lambda: None  # the stream's clean-up, run by the HTTP layer however the stream ends


@dataclass
class Output:
    """How a request's answer is shaped: its grammar (compiled, unchecked against nothing else) and
    whether it is read back for tool calls."""

    functions: list[dict[str, Any]] | None  # the tools offered (OpenAI function objects)
    calls: bool  # the model may call them: the prompt ends at <|assistant|>, the answer is read for calls
    grammar: str | None  # what each choice's matcher is made of


@dataclass
class Run:
    """One admitted request, from its path decision on: one sequence per choice (n)."""

    id: str
    request: ChatCompletionRequest
    generations: list[GenerationRequest]
    handles: list[RequestHandle]
    started: Started
    arrival: float
    reasoning: bool  # return the thinking block as reasoning_content
    functions: set[str] | None = None  # when the answer may call tools: their names, for ToolCallReader
    first_token: bool = False
    answered: bool = False  # its outcome is in the metrics

    @property
    def generation(self) -> GenerationRequest:
        return self.generations[0]


class EngineClient(Protocol):
    """What the chat service needs of a runtime (runtime/client.py LocalEngine is this process's)."""

    mode: str  # dynamic | static
    exit_layers: list[int]
    context_len: int
    max_media_tokens: int
    think_end: int | None
    request_override: bool
    max_batch_size: int
    model_config: dict  # the exported model's config (manifest)
    queue_depth: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def alive(self) -> bool: ...
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle: ...
    def cancel(self, handle: RequestHandle) -> None: ...
    def memory(self) -> dict: ...
    def stats(self) -> dict: ...
    def reset_peaks(self) -> None: ...
    def degraded(self) -> dict[str, str]: ...


class ChatService:
    """OpenAI chat completions over an engine client: parse and check a request, turn it into a
    GenerationRequest, and its events into a response or a stream."""

    def __init__(self, server: ServerConfig, engine: EngineClient, tokenizer: ChatTokenizer, metrics: Metrics):
        self.server, self.engine, self.tokenizer, self.metrics = server, engine, tokenizer, metrics
        model = engine.model_config
        self.image_size = model["vision"]["image_size"]
        self.image_tokens = (model["vision"]["image_size"] // model["vision"]["patch_size"]) ** 2
        self.audio = AudioArgs(**model["audio"])
        exported_seconds = self.audio.max_frames * self.audio.hop_length / self.audio.sample_rate
        self.limits = MediaLimits(
            max_image_pixels=self.server.max_image_pixels,
            max_audio_seconds=min(self.server.max_audio_seconds or exported_seconds, exported_seconds),
            max_fetch_bytes=self.server.max_body_bytes,
            allowed_image_hosts=frozenset(h.lower() for h in self.server.allowed_image_hosts),
            fetch_timeout_s=self.server.image_fetch_timeout_s,
        )
        self.grammars = GrammarCompiler(tokenizer, model["text"]["vocab_size"])
        self.assistant_id = tokenizer.token_id("<|assistant|>")
        self.created = int(time.time())
        self.draining = False
        self.in_flight = 0
        self.replica: str | None = None  # the cluster replica this service is, named in every response (runtime/cluster.py)
        metrics.watch_memory(self.memory)

    # --- small endpoints ------------------------------------------------------------------------------

    def models(self) -> dict:
        return ModelList(data=[ModelCard(id=self.server.model_id, created=self.created)]).model_dump()

    def memory(self) -> dict:
        return self.engine.memory()

    def stats(self) -> dict:
        return self.engine.stats()

    def degraded(self) -> dict[str, str]:
        return self.engine.degraded()

    def reset_stats(self) -> dict:
        self.engine.reset_peaks()
        return self.stats()

    # --- chat completions ---------------------------------------------------------------------------------

    async def chat(self, body: bytes, disconnected: Callable[[], Awaitable[bool]]) -> Reply:
        arrival = time.perf_counter()
        if self.draining:
            raise self.observe(APIError(503, "the server is shutting down; retry on another replica", "server_error",
                                        code="shutting_down", headers={"Retry-After": str(self.server.retry_after_s)}), arrival)
        self.in_flight += 1
        try:
            timeline = Timeline(arrival)
            request = await asyncio.to_thread(self.parse, body)  # a 30 MB body of base64 would stall every stream for a while
            timeline.mark("parse")
            generations, output = await self.prepare(request, timeline)
            run = await self.start(request, generations, output, disconnected, arrival)
        except APIError as e:
            self.in_flight -= 1
            raise self.observe(e, arrival)
        except BaseException as e:
            self.in_flight -= 1
            if isinstance(e, ClientGone):
                self.metrics.requests.labels("499").inc()
            raise
        headers = {"x-dyngraph-path": run.started.path.name}
        if request.stream:
            return Reply(headers, chunks=self.stream(run), close=lambda: self.close(run))
        try:
            return Reply(headers, body=await self.collect(run, disconnected))
        finally:
            self.close(run)

    def parse(self, body: bytes) -> ChatCompletionRequest:
        try:
            data = json.loads(body, parse_constant=not_json)
        except RecursionError:
            raise APIError(400, "the request body nests arrays or objects deeper than the server parses") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        # JSON's \ud800 escapes decode to lone surrogates, which are no characters: nothing downstream
        # (the tokenizer, a UTF-8 response echoing them) can take them
        where = surrogate_path(data)
        if where is not None:
            raise APIError(400, f"{where or 'the request body'}: a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                "escape), which is not a Unicode character", param=where or None)
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            param, message = validation_error(e)
            raise APIError(400, f"{param}: {message}" if param else message, param=param or None) from None

    async def prepare(self, req: ChatCompletionRequest, timeline: Timeline) -> tuple[list[GenerationRequest], Output]:
        """Validate everything, decode the media, compile the grammar; the result can only fail inside
        the engine. One generation request per choice (n), each with its copy of the timeline so far."""
        if req.model != self.server.model_id:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.server.model_id}`",
                           param="model", code="model_not_found")
        self.check_unsupported(req)
        self.check_limits(req)
        thinking = bool(req.enable_thinking or (req.chat_template_kwargs or {}).get("enable_thinking"))
        if thinking and self.engine.think_end is None:
            raise APIError(400, "enable_thinking needs a tokenizer with </think>; this one has none", param="enable_thinking")
        output = await asyncio.to_thread(self.output, req)
        timeline.mark("grammar")
        if thinking and (output.grammar is not None or output.calls):
            raise APIError(400, "enable_thinking with tools or response_format is not supported: the answer's grammar or GLM-4's "
                                "call format starts where the thinking block would", param="tools" if req.tools else "response_format")
        messages, images, audio = self.split_messages(req.messages)
        prompt = self.tokenizer.apply_chat_template(messages, enable_thinking=thinking, tools=output.functions, call_tools=output.calls)
        timeline.mark("tokenize")
        context = self.engine.context_len
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, context - len(prompt))
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in the completion). "
                                "Please reduce the length of the messages or completion.",
                           param="max_tokens" if len(prompt) < context else "messages", code="context_length_exceeded")
        pixel_values, mel = await self.decode_media(images, audio)
        timeline.mark("media")
        modalities = ("text",) + (("image",) if images else ()) + (("audio",) if audio else ())
        if self.engine.mode == "dynamic":
            media_tokens = len(images) * self.image_tokens + (mel.shape[-1] // self.audio.frame_multiple if mel is not None else 0)
            if media_tokens > self.engine.max_media_tokens:
                raise APIError(400, f"the request's media make {media_tokens} media tokens, over the {self.engine.max_media_tokens} "
                                    "the engines were exported for: send fewer images or shorter audio", param="messages")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if req.exit_layer is not None:
            if not self.engine.request_override:
                raise APIError(400, "exit_layer is honoured only when the server runs with runtime.policy.request_override=true",
                               param="exit_layer")
            if req.exit_layer not in self.engine.exit_layers:
                raise APIError(400, f"exit_layer must be one of the exported exits {self.engine.exit_layers}", param="exit_layer")
        if req.draft_exit is not None and req.draft_exit not in self.engine.exit_layers[:-1]:
            raise APIError(400, f"draft_exit must be an exit short of the last, one of {self.engine.exit_layers[:-1]}", param="draft_exit")
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        sampling = SamplingParams(temperature, top_p, top_k, req.seed,
                                  presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                                  repetition_penalty=req.repetition_penalty or 1.0, logit_bias=self.logit_bias(req),
                                  logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        base = GenerationRequest(
            prompt_ids=prompt, max_tokens=max_tokens, modalities=modalities, pixel_values=pixel_values, mel=mel, sampling=sampling,
            stop=tuple(stop), ignore_eos=bool(req.ignore_eos), thinking=thinking, max_reasoning_steps=req.max_reasoning_steps if thinking else None,
            policy_text=next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""),
            exit_layer=req.exit_layer, speculative=req.speculative, draft_exit=req.draft_exit,
        )
        # n choices: a sequence each (its own prefill), choice i seeded with seed + i so that they differ and reproduce
        out = []
        for i in range(req.n or 1):
            seed = None if req.seed is None else (req.seed + i) % 2**64 if req.seed >= 0 else req.seed - i
            out.append(replace(base, sampling=replace(sampling, seed=seed), grammar=None if output.grammar is None
                               else self.grammars.matcher(output.grammar), timeline=timeline.copy()))
        return out, output

    def check_unsupported(self, req: ChatCompletionRequest) -> None:
        """Parameters that would change the answer and that the runtime does not implement: refused, not ignored."""
        if (req.n or 1) > self.server.max_n:
            raise APIError(400, f"n={req.n}: at most {self.server.max_n} choices per request (server.max_n)", param="n")
        extra = req.model_extra or {}
        for name, (why, harmless) in REFUSED.items():
            value = extra.get(name)
            if not any(value == h and type(value) is type(h) for h in HARMLESS) and value not in harmless:
                raise APIError(400, f"{name}: {why} by this server", param=name)

    def logit_bias(self, req: ChatCompletionRequest) -> tuple[tuple[int, float], ...]:
        out = []
        for key, bias in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model's tokenizer (0..{self.tokenizer.vocab_size - 1})",
                               param="logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias: the bias of token {key} is {bias}, outside [-100, 100]", param="logit_bias")
            out.append((int(key), float(bias)))
        return tuple(out)

    def output(self, req: ChatCompletionRequest) -> Output:
        """tools, tool_choice, parallel_tool_calls and response_format as an Output; every schema is
        compiled here, and one the grammar engine cannot compile is a 400 naming it (on a worker thread:
        a large schema takes a while)."""
        functions = [t.function.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []]
        names = [f["name"] for f in functions]
        if len(set(names)) < len(names):
            raise APIError(400, f"tools: two functions are named {next(n for n in names if names.count(n) > 1)!r}", param="tools")
        choice = req.tool_choice
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                                    f"{names}", param="tool_choice")
            choice = choice.function.name
        elif choice is None:
            choice = "auto" if functions else "none"
        elif choice == "required" and not functions:
            raise APIError(400, "tool_choice=required needs tools", param="tool_choice")
        for i, f in enumerate(functions):
            if "parameters" in f and (not isinstance(f["parameters"], dict) or f["parameters"].get("type", "object") != "object"):
                raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema of an object", param=f"tools.{i}.function.parameters")
            self.compile(lambda: self.grammars.json_schema(parameters_of(f)), f"tools.{i}.function.parameters")
        schema = None
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format.json_schema")
            schema = fmt.json_schema.schema_
            self.compile(lambda: self.grammars.json_schema(schema), "response_format.json_schema.schema")
        text = grammar_for(functions, choice, req.parallel_tool_calls is not False, schema)
        grammar = None
        if text is not None:
            grammar = self.compile(lambda: self.grammars.lark(text), "tools" if functions and choice != "none" else "response_format")
        return Output(functions or None, bool(functions) and choice != "none", grammar)

    def compile(self, make: Callable[[], str], param: str) -> str:
        """The grammar `make` builds, checked: whatever the grammar engine cannot build or compile from
        the request (a schema, a tool's parameters) is a 400 naming `param`."""
        try:
            grammar = make()
            self.grammars.check(grammar)
        except GrammarError as e:
            raise APIError(400, f"{param}: the grammar engine cannot compile it: {e}", param=param, code="invalid_schema") from None
        return grammar

    def check_limits(self, req: ChatCompletionRequest) -> None:
        """The server.max_* bounds on one request's work, before anything is tokenized or decoded."""
        s = self.server
        if len(req.messages) > s.max_messages:
            raise APIError(400, f"the request has {len(req.messages)} messages; at most {s.max_messages} (server.max_messages)",
                           param="messages", code="array_above_max_length")
        characters = 0
        for i, m in enumerate(req.messages):
            parts = [m.content] if isinstance(m.content, str) else m.content or []
            if len(parts) > s.max_content_parts:
                raise APIError(400, f"messages.{i}.content has {len(parts)} parts; at most {s.max_content_parts} (server.max_content_parts)",
                               param=f"messages.{i}.content", code="array_above_max_length")
            characters += sum(len(p) if isinstance(p, str) else len(p.text) for p in parts if isinstance(p, str) or p.type == "text")
        if characters > s.max_characters:
            raise APIError(400, f"the messages hold {characters} characters of text; at most {s.max_characters} (server.max_characters)",
                           param="messages", code="string_above_max_length")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > s.max_stop:
            raise APIError(400, f"the request has {len(stop)} stop strings; at most {s.max_stop} (server.max_stop)",
                           param="stop", code="array_above_max_length")
        for i, text in enumerate(stop):
            if len(text) > s.max_stop_chars:
                raise APIError(400, f"stop string {i} has {len(text)} characters; at most {s.max_stop_chars} (server.max_stop_chars)",
                               param="stop", code="string_above_max_length")

    def split_messages(self, messages: list[ChatMessage]) -> tuple[list[dict[str, str]], list[tuple[str, str]], list[tuple[str, str, str]]]:
        """Chat template messages, and the media parts with the parameter path each came from.

        Media reach the decoder through cross-attention, not as tokens, so they leave no trace in the prompt."""
        out, images, audio = [], [], []
        for i, m in enumerate(messages):
            texts = []
            parts = [m.content] if isinstance(m.content, str) else m.content or []
            for j, part in enumerate(parts):
                where = f"messages.{i}.content.{j}"
                if isinstance(part, str):
                    texts.append(part)
                elif part.type == "text":
                    texts.append(part.text)
                elif m.role != "user":
                    raise APIError(400, f"{where}: {part.type} parts are accepted in user messages only", param=where)
                elif part.type == "image_url":
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url  # older clients send the bare URL
                    images.append((url, f"{where}.image_url" + ("" if isinstance(part.image_url, str) else ".url")))
                else:
                    audio.append((part.input_audio.data, part.input_audio.format, f"{where}.input_audio"))
            message = {"role": ROLES[m.role], "content": "\n".join(texts)}
            if m.role == "assistant" and m.tool_calls:
                message["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
            out.append(message)
        max_images = 1 if self.engine.mode == "static" else self.server.max_images
        if len(images) > max_images:
            why = "the static graph has room for one image" if self.engine.mode == "static" else "server.max_images"
            raise APIError(400, f"the request has {len(images)} images; at most {max_images} ({why})", param="messages")
        if len(audio) > 1:
            raise APIError(400, f"the request has {len(audio)} audio parts; at most 1", param="messages")
        return out, images, audio

    async def decode_media(self, images: list[tuple[str, str]], audio: list[tuple[str, str, str]]):
        try:
            pixel_values = None
            if images:
                raw = [await image_bytes(url, self.limits, param) for url, param in images]
                pixel_values = torch.stack(await asyncio.gather(*(
                    asyncio.to_thread(decode_image, data, self.limits, self.image_size, param) for data, (_, param) in zip(raw, images))))
            mel = None
            if audio:
                data, fmt, param = audio[0]
                mel = await asyncio.to_thread(self.decode_wav, data, fmt, param)
        except MediaError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_media") from None
        return pixel_values, mel

    def decode_wav(self, data: str, fmt: str, param: str) -> torch.Tensor:
        return decode_audio(decode_base64(data, f"{param}.data"), fmt, self.limits, self.audio, param)

    async def start(self, request: ChatCompletionRequest, generations: list[GenerationRequest], output: Output,
                    disconnected: Callable[[], Awaitable[bool]], arrival: float) -> Run:
        """Queue the request's sequences (one per choice) and wait for their path decision (the
        response headers carry it: the same prompt takes the same path)."""
        run_id = f"chatcmpl-{uuid.uuid4().hex}"
        handles: list[RequestHandle] = []
        try:
            for i, generation in enumerate(generations):
                generation.request_id = run_id if len(generations) == 1 else f"{run_id}-{i}"
                handles.append(self.engine.submit(generation, asyncio.get_running_loop()))
        except QueueFull:
            for h in handles:
                self.engine.cancel(h)
            raise APIError(429, f"the server is at capacity ({self.engine.max_batch_size} generating, "
                                f"{self.engine.queue_depth} queued); retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.server.retry_after_s)}) from None
        started = None
        try:
            for handle in handles:
                event = await self.next_event(handle, disconnected)
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message, "server_error", code="engine_unavailable" if event.status == 503 else None)
                assert isinstance(event, Started), event
                started = started or event
        except BaseException:
            for h in handles:
                self.engine.cancel(h)
            raise
        functions = {f["name"] for f in output.functions} if output.calls else None
        return Run(run_id, request, generations, handles, started, arrival,
                   reasoning=bool(request.return_reasoning) and generations[0].thinking, functions=functions)

    async def next_event(self, handle: RequestHandle, disconnected: Callable[[], Awaitable[bool]]) -> Event:
        """The handle's next event, cancelling the request if the client has left: checked at least
        every DISCONNECT_POLL_S, also while tokens keep coming."""
        while True:
            now = time.monotonic()
            if now - handle.polled_at >= DISCONNECT_POLL_S:
                handle.polled_at = now
                if await disconnected():
                    self.engine.cancel(handle)
                    raise ClientGone
            try:
                async with asyncio.timeout(handle.polled_at + DISCONNECT_POLL_S - now):  # a timer per event, not a task
                    return await handle.next()
            except TimeoutError:
                continue

    def reader(self, run: Run) -> ToolCallReader | None:
        return None if run.functions is None else ToolCallReader(run.functions, self.assistant_id)

    async def collect(self, run: Run, disconnected: Callable[[], Awaitable[bool]]) -> dict:
        tasks = [asyncio.ensure_future(self.collect_choice(run, i, disconnected)) for i in range(len(run.handles))]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        finished = [f for _, f in results]
        body = ChatCompletion(id=run.id, created=int(time.time()), model=self.server.model_id, usage=self.usage(finished),
                              choices=[c for c, _ in results], dyngraph=self.info(run, finished))
        self.done(run, finished)
        return body.model_dump(exclude_none=True)

    async def collect_choice(self, run: Run, index: int, disconnected: Callable[[], Awaitable[bool]]) -> tuple[Choice, Finished]:
        content, reasoning, logprobs = [], [], []
        reader = self.reader(run)
        while True:
            event = await self.next_event(run.handles[index], disconnected)
            self.note_first_token(run)
            if isinstance(event, Delta):
                reasoning.append(event.reasoning)
                if reader is None:
                    content.append(event.content)
                else:
                    reader.feed(event.content, event.token)
                if event.logprob is not None:
                    logprobs.append(self.token_logprob(event))
            elif isinstance(event, Failed):
                run.answered = True
                raise self.observe(APIError(event.status, event.message, "server_error"), run.arrival)
            else:
                break
        calls = None
        if reader is not None:
            reader.finish()
            content = reader.content
            calls = [ResponseToolCall(id=c["id"], function=ResponseFunctionCall(name=c["name"], arguments=c["arguments"]))
                     for c in reader.calls] or None
        text = "".join(content)
        message = ResponseMessage(content=text if text or not calls else None, tool_calls=calls,
                                  reasoning_content="".join(reasoning) if run.reasoning else None)
        choice = Choice(index=index, message=message, finish_reason=self.finish_reason(event, calls),
                        logprobs=ChoiceLogprobs(content=logprobs) if run.generation.sampling.logprobs is not None else None)
        return choice, event

    @staticmethod
    def finish_reason(event: Finished, calls) -> str:
        return "tool_calls" if calls and event.reason == "stop" else event.reason

    def token_logprob(self, event: Delta) -> TokenLogprob:
        """OpenAI's entry for one sampled token: its text and bytes, its logprob and the top ones (-9999 for -inf, as OpenAI)."""
        logprob, top = event.logprob

        def entry(token: int, value: float) -> dict:
            data = self.grammars.tokenizer.decode_bytes([token])
            return {"token": data.decode("utf-8", "replace"), "logprob": max(value, -9999.0), "bytes": list(data)}

        return TokenLogprob(**entry(event.token, logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in top])

    async def events(self, run: Run) -> AsyncIterator[tuple[int, Event]]:
        """Every choice's events as they come, with the choice's index, until each has finished or one failed."""
        if len(run.handles) == 1:  # one choice: its own queue, without a task copying it into another
            while True:
                event = await run.handles[0].next()
                yield 0, event
                if isinstance(event, (Finished, Failed)):
                    return
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            while True:
                event = await handle.next()
                await queue.put((index, event))
                if isinstance(event, (Finished, Failed)):
                    return

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(run.handles)]
        try:
            left = len(tasks)
            while left:
                index, event = await queue.get()
                yield index, event
                if isinstance(event, Failed):
                    return
                left -= isinstance(event, Finished)
        finally:
            for t in tasks:
                t.cancel()

    async def stream(self, run: Run) -> AsyncIterator[str]:
        """SSE data lines; the HTTP layer cancels the generation when the client goes away."""
        include_usage = bool(run.request.stream_options and run.request.stream_options.include_usage)
        created = int(time.time())  # OpenAI's: every chunk has the completion's timestamp

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None, last: bool = False,
                  finished: list[Finished] | None = None) -> str:
            c = ChatCompletionChunk(id=run.id, created=created, model=self.server.model_id, choices=choices,
                                    usage=usage, dyngraph=self.info(run, finished) if last else None)
            data = c.model_dump()
            for choice in data["choices"]:
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
                for call in choice["delta"].get("tool_calls", []):
                    for k in [k for k, v in call.items() if v is None]:
                        del call[k]
                    call["function"] = {k: v for k, v in call["function"].items() if v is not None}
            if not last:
                del data["dyngraph"]
            if not include_usage:
                del data["usage"]
            return sse_json(data)

        def text_chunk(index: int, field: str) -> tuple[str, str]:
            """chunk()'s line for a delta of one text field, cut around the field's JSON string:
            the two parts a token's text goes between (no models built per token)."""
            line = chunk([ChunkChoice(index=index, delta=DeltaMessage(**{field: ""}))])
            cut = line.index(f'"delta": {{"{field}": ""}}') + len(f'"delta": {{"{field}": ')  # quotes outside strings are JSON's own
            return line[:cut], line[cut + 2:]

        n = len(run.handles)
        readers = [self.reader(run) for _ in range(n)]
        templates: dict[tuple[int, str], tuple[str, str]] = {}
        finished: list[Finished | None] = [None] * n
        yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)])
        written = False  # the first token's chunk: the timeline's last part ends once it is sent
        async for index, event in self.events(run):
            self.note_first_token(run)
            if isinstance(event, Delta):
                # a chunk per token, its text possibly empty (incomplete UTF-8, hidden reasoning)
                if event.logprob is None and readers[index] is None:  # text alone: into its template
                    reasoning = bool(event.reasoning and run.reasoning)
                    field, text = ("reasoning_content", event.reasoning) if reasoning else ("content", event.content)
                    if (index, field) not in templates:
                        templates[index, field] = text_chunk(index, field)
                    head, tail = templates[index, field]
                    yield head + sse_string(text) + tail
                else:
                    logprobs = ChoiceLogprobs(content=[self.token_logprob(event)]) if event.logprob is not None else None
                    if event.reasoning and run.reasoning:
                        delta = DeltaMessage(reasoning_content=event.reasoning)
                    elif readers[index] is None:
                        delta = DeltaMessage(content=event.content)
                    else:
                        delta = self.pieces_delta(readers[index].feed(event.content, event.token))
                    yield chunk([ChunkChoice(index=index, delta=delta, logprobs=logprobs)])
                if not written:  # resumed: the server sent the chunk
                    written = True
                    run.generation.timeline.mark("write")
            elif isinstance(event, Failed):
                # the status line is long gone: report in the stream, as OpenAI does
                yield json.dumps(APIError(event.status, event.message, "server_error").body())
                run.answered = True
                self.observe(APIError(event.status, event.message), run.arrival)
                break
            else:
                finished[index] = event
                reader = readers[index]
                if reader is not None and (tail := reader.finish()):
                    yield chunk([ChunkChoice(index=index, delta=self.pieces_delta(tail))])
                everything = all(f is not None for f in finished)
                if everything:
                    self.done(run, finished)  # before the last sends: a client that leaves now still got a whole answer
                reason = self.finish_reason(event, reader.calls if reader is not None else None)
                yield chunk([ChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)],
                            last=everything and not include_usage, finished=finished if everything else None)
                if everything and include_usage:
                    yield chunk([], usage=self.usage(finished), last=True, finished=finished)
        yield "[DONE]"

    @staticmethod
    def pieces_delta(pieces: list[Piece]) -> DeltaMessage:
        """One token's pieces of a tool-format answer as a delta: its text, and per call its start and arguments."""
        calls: dict[int, DeltaToolCall] = {}
        text = "".join(p.content for p in pieces)
        for p in pieces:
            if p.call is None:
                continue
            call = calls.setdefault(p.call, DeltaToolCall(index=p.call, function=DeltaFunction()))
            if p.id is not None:
                call.id, call.type, call.function.name = p.id, "function", p.name
                call.function.arguments = call.function.arguments or ""
            if p.arguments:
                call.function.arguments = (call.function.arguments or "") + p.arguments
        return DeltaMessage(content=text if text or not calls else None, tool_calls=list(calls.values()) or None)

    def close(self, run: Run) -> None:
        """However the response ended: a generation nobody reads any more stops (a finished one is
        unaffected), and the request leaves the books."""
        for handle in run.handles:
            self.engine.cancel(handle)
        self.in_flight -= 1
        if not run.answered:  # the client left first
            run.answered = True
            self.metrics.requests.labels("499").inc()

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def note_first_token(self, run: Run) -> None:
        """The first event after the path decision has reached this loop (its token, or the end)."""
        if not run.first_token:
            run.first_token = True
            run.generation.timeline.mark("deliver")
            self.metrics.ttft.observe(time.perf_counter() - run.arrival)

    def done(self, run: Run, finished: list[Finished]) -> None:
        run.answered = True
        self.metrics.tokens.labels("prompt").inc(finished[0].prompt_tokens)
        self.metrics.tokens.labels("completion").inc(sum(f.completion_tokens for f in finished))
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.observe(time.perf_counter() - run.arrival)
        for part, seconds in run.generation.timeline.parts().items():
            self.metrics.ttft_parts.labels(part).observe(seconds)

    def observe(self, error: APIError, arrival: float) -> APIError:
        self.metrics.requests.labels(str(error.status)).inc()
        self.metrics.latency.observe(time.perf_counter() - arrival)
        return error

    @staticmethod
    def usage(finished: list[Finished]) -> Usage:
        """The prompt once (its choices share it), the completions of every choice."""
        prompt, completion = finished[0].prompt_tokens, sum(f.completion_tokens for f in finished)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=finished[0].cached_tokens),
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=sum(f.reasoning_tokens for f in finished)))

    def info(self, run: Run, finished: list[Finished] | None) -> DyngraphInfo:
        s = run.started
        speculation = None
        for f in finished or []:
            if f.speculation is not None:
                speculation = {k: (speculation or {}).get(k, 0) + v for k, v in f.speculation.items()}
        return DyngraphInfo(path=s.path.name, exit_layer=s.path.exit_layer, modalities=list(run.generation.modalities),
                            engines=s.engines, devices=s.devices, mode=s.mode, replica=self.replica, speculation=speculation,
                            timeline={part: round(seconds * 1e3, 3) for part, seconds in run.generation.timeline.parts().items()})


JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(..., ensure_ascii=False), without an encoder made per call


def sse_json(data: dict) -> str:
    """JSON for one SSE data line, UTF-8 as is except for the three characters that JSON leaves raw
    but line splitters treat as line ends (NEL, U+2028, U+2029: httpx's aiter_lines, str.splitlines):
    a sampled token that decodes to one of them would cut the chunk in two."""
    return line_safe(JSON.encode(data))


def sse_string(text: str) -> str:
    """One string's JSON as sse_json writes it inside a line."""
    return line_safe(JSON.encode(text))


def line_safe(json_text: str) -> str:
    """JSON text with NEL, U+2028 and U+2029 escaped (they occur in its strings only)."""
    if json_text.isascii():
        return json_text
    return json_text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def surrogate_path(data) -> str | None:
    """The parameter path of the first string holding a lone surrogate ("" for the body itself, the
    object's path for a key), else None. A loop, not recursion: JSON nests as deep as json.loads allows."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and SURROGATES.search(value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                if not k.isascii() and SURROGATES.search(k):
                    return path  # the key itself cannot be echoed
                stack.append((f"{path}.{k}" if path else k, v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


def validation_error(e: ValidationError) -> tuple[str, str]:
    """pydantic's most specific error as (parameter path, message). A union reports one error per
    member, labelled by the member's type (`str`, `list[tagged-union[...]]`); the deepest is the
    one about what the client meant, and the labels are no part of the parameter's name."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in UNION_LABELS))]
    # a tagged union names the tag before the member's own fields (image_url.image_url.url): keep one
    loc = [p for i, p in enumerate(loc) if i + 1 == len(loc) or p != loc[i + 1]]
    return ".".join(loc), err["msg"]
