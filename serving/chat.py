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
from typing import Protocol
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from model.multimodal.audio import AudioArgs
from model.tokenizer import ChatTokenizer
from serving.config import ServerConfig
from runtime.generation import (Delta, Event, Failed, Finished, GenerationRequest, QueueFull,
                                RequestHandle, Started)
from serving.media import MediaError, MediaLimits, decode_audio, decode_base64, decode_image, image_bytes
from runtime.metrics import Metrics
from serving.protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice, ChunkChoice,
                              CompletionTokensDetails, DeltaMessage, DyngraphInfo, ErrorBody, ErrorResponse, ModelCard,
                              ModelList, ResponseMessage, Usage)
from runtime.sampling import SamplingParams

log = logging.getLogger("dyngraph.serving")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
DISCONNECT_POLL_S = 0.25
UNION_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}
# a temperature or top_p this small is greedy (as in vLLM): logits / 1e-300 are inf, and a top_p of 1e-300 is 0 in
# float32, which would drop every token; either way the probabilities become NaN
GREEDY_BELOW = 1e-5
SURROGATES = re.compile("[\ud800-\udfff]")


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
class Run:
    """One admitted request, from its path decision on."""

    id: str
    request: ChatCompletionRequest
    generation: GenerationRequest
    handle: RequestHandle
    started: Started
    arrival: float
    reasoning: bool  # return the thinking block as reasoning_content
    first_token: bool = False
    answered: bool = False  # its outcome is in the metrics


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
            request = await asyncio.to_thread(self.parse, body)  # a 30 MB body of base64 would stall every stream for a while
            generation = await self.prepare(request)
            run = await self.start(request, generation, disconnected, arrival)
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

    async def prepare(self, req: ChatCompletionRequest) -> GenerationRequest:
        """Validate everything, decode the media; the result can only fail inside the engine."""
        if req.model != self.server.model_id:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.server.model_id}`",
                           param="model", code="model_not_found")
        self.check_unsupported(req)
        self.check_limits(req)
        thinking = bool(req.enable_thinking or (req.chat_template_kwargs or {}).get("enable_thinking"))
        if thinking and self.engine.think_end is None:
            raise APIError(400, "enable_thinking needs a tokenizer with </think>; this one has none", param="enable_thinking")
        messages, images, audio = self.split_messages(req.messages)
        prompt = self.tokenizer.apply_chat_template(messages, enable_thinking=thinking)
        context = self.engine.context_len
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, context - len(prompt))
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in the completion). "
                                "Please reduce the length of the messages or completion.",
                           param="max_tokens" if len(prompt) < context else "messages", code="context_length_exceeded")
        pixel_values, mel = await self.decode_media(images, audio)
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
        top_p = 1.0 if req.top_p is None else req.top_p  # a top_p this small keeps the likeliest token only: greedy
        if req.exit_layer is not None:
            if not self.engine.request_override:
                raise APIError(400, "exit_layer is honoured only when the server runs with runtime.policy.request_override=true",
                               param="exit_layer")
            if req.exit_layer not in self.engine.exit_layers:
                raise APIError(400, f"exit_layer must be one of the exported exits {self.engine.exit_layers}", param="exit_layer")
        if req.draft_exit is not None and req.draft_exit not in self.engine.exit_layers[:-1]:
            raise APIError(400, f"draft_exit must be an exit short of the last, one of {self.engine.exit_layers[:-1]}", param="draft_exit")
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        return GenerationRequest(
            prompt_ids=prompt, max_tokens=max_tokens, modalities=modalities, pixel_values=pixel_values, mel=mel,
            sampling=SamplingParams(0.0 if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW else temperature, top_p, top_k, req.seed),
            stop=tuple(stop), ignore_eos=bool(req.ignore_eos), thinking=thinking, max_reasoning_steps=req.max_reasoning_steps if thinking else None,
            policy_text=next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""),
            exit_layer=req.exit_layer, speculative=req.speculative, draft_exit=req.draft_exit,
        )

    @staticmethod
    def check_unsupported(req: ChatCompletionRequest) -> None:
        """Parameters that would change the answer and that the runtime does not implement: refused, not ignored."""
        if (req.n or 1) != 1:
            raise APIError(400, f"n={req.n}: only n=1 is supported", param="n")
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server (send 0 or leave it out)", param=name)

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
            out.append({"role": ROLES[m.role], "content": "\n".join(texts)})
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

    async def start(self, request: ChatCompletionRequest, generation: GenerationRequest,
                    disconnected: Callable[[], Awaitable[bool]], arrival: float) -> Run:
        """Queue the request and wait for its path decision (the response headers carry it)."""
        run_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation.request_id = run_id
        try:
            handle = self.engine.submit(generation, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(429, f"the server is at capacity ({self.engine.max_batch_size} generating, "
                                f"{self.engine.queue_depth} queued); retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.server.retry_after_s)}) from None
        event = await self.next_event(handle, disconnected)
        if isinstance(event, Failed):
            raise APIError(event.status, event.message, "server_error", code="engine_unavailable" if event.status == 503 else None)
        assert isinstance(event, Started), event
        return Run(run_id, request, generation, handle, event, arrival,
                   reasoning=bool(request.return_reasoning) and generation.thinking)

    async def next_event(self, handle: RequestHandle, disconnected: Callable[[], Awaitable[bool]]) -> Event:
        """The handle's next event, cancelling the request if the client has left: checked at least
        every DISCONNECT_POLL_S, also while tokens keep coming."""
        pending = asyncio.ensure_future(handle.next())
        while True:
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            now = time.monotonic()
            if not done or now - handle.polled_at >= DISCONNECT_POLL_S:
                handle.polled_at = now
                if await disconnected():
                    pending.cancel()
                    self.engine.cancel(handle)
                    raise ClientGone
            if done:
                return pending.result()

    async def collect(self, run: Run, disconnected: Callable[[], Awaitable[bool]]) -> dict:
        content, reasoning = [], []
        while True:
            event = await self.next_event(run.handle, disconnected)
            self.note_first_token(run)
            if isinstance(event, Delta):
                content.append(event.content)
                reasoning.append(event.reasoning)
            elif isinstance(event, Failed):
                run.answered = True
                raise self.observe(APIError(event.status, event.message, "server_error"), run.arrival)
            else:
                break
        message = ResponseMessage(content="".join(content), reasoning_content="".join(reasoning) if run.reasoning else None)
        body = ChatCompletion(id=run.id, created=int(time.time()), model=self.server.model_id, usage=self.usage(event),
                              choices=[Choice(message=message, finish_reason=event.reason)], dyngraph=self.info(run, event))
        self.done(run, event)
        return body.model_dump(exclude_none=True)

    async def stream(self, run: Run) -> AsyncIterator[str]:
        """SSE data lines; the HTTP layer cancels the generation when the client goes away."""
        include_usage = bool(run.request.stream_options and run.request.stream_options.include_usage)

        def chunk(delta: DeltaMessage | None = None, finish: str | None = None, usage: Usage | None = None, last: bool = False,
                  finished: Finished | None = None) -> str:
            choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
            c = ChatCompletionChunk(id=run.id, created=int(time.time()), model=self.server.model_id, choices=choices,
                                    usage=usage, dyngraph=self.info(run, finished) if last else None)
            data = c.model_dump()
            for choice in data["choices"]:
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            if not last:
                del data["dyngraph"]
            if not include_usage:
                del data["usage"]
            return sse_json(data)

        yield chunk(DeltaMessage(role="assistant", content=""))
        while True:
            event = await run.handle.next()
            self.note_first_token(run)
            if isinstance(event, Delta):
                # a chunk per token, its text possibly empty (incomplete UTF-8, hidden reasoning)
                if event.reasoning and run.reasoning:
                    yield chunk(DeltaMessage(reasoning_content=event.reasoning))
                else:
                    yield chunk(DeltaMessage(content=event.content))
            elif isinstance(event, Failed):
                # the status line is long gone: report in the stream, as OpenAI does
                yield json.dumps(APIError(event.status, event.message, "server_error").body())
                run.answered = True
                self.observe(APIError(event.status, event.message), run.arrival)
                break
            else:
                self.done(run, event)  # before the last sends: a client that leaves now still got a whole answer
                yield chunk(DeltaMessage(), finish=event.reason, last=not include_usage, finished=event)
                if include_usage:
                    yield chunk(usage=self.usage(event), last=True, finished=event)
                break
        yield "[DONE]"

    def close(self, run: Run) -> None:
        """However the response ended: a generation nobody reads any more stops (a finished one is
        unaffected), and the request leaves the books."""
        self.engine.cancel(run.handle)
        self.in_flight -= 1
        if not run.answered:  # the client left first
            run.answered = True
            self.metrics.requests.labels("499").inc()

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def note_first_token(self, run: Run) -> None:
        if not run.first_token:
            run.first_token = True
            self.metrics.ttft.observe(time.perf_counter() - run.arrival)

    def done(self, run: Run, event: Finished) -> None:
        run.answered = True
        self.metrics.tokens.labels("prompt").inc(event.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(event.completion_tokens)
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.observe(time.perf_counter() - run.arrival)

    def observe(self, error: APIError, arrival: float) -> APIError:
        self.metrics.requests.labels(str(error.status)).inc()
        self.metrics.latency.observe(time.perf_counter() - arrival)
        return error

    @staticmethod
    def usage(event: Finished) -> Usage:
        return Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                     total_tokens=event.prompt_tokens + event.completion_tokens,
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=event.reasoning_tokens))

    def info(self, run: Run, finished: Finished | None) -> DyngraphInfo:
        s = run.started
        return DyngraphInfo(path=s.path.name, exit_layer=s.path.exit_layer, modalities=list(run.generation.modalities),
                            engines=s.engines, devices=s.devices, mode=s.mode, replica=self.replica,
                            speculation=finished.speculation if finished is not None else None)


def sse_json(data: dict) -> str:
    """JSON for one SSE data line, UTF-8 as is except for the three characters that JSON leaves raw
    but line splitters treat as line ends (NEL, U+2028, U+2029: httpx's aiter_lines, str.splitlines):
    a sampled token that decodes to one of them would cut the chunk in two."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


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
