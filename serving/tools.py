"""OpenAI tools and structured output over GLM-4's own tool format.

GLM-4 calls a function by answering `<|assistant|>{name}\\n{arguments as JSON}` and ends the turn
with `<|observation|>`, where the tool's result comes back; a text answer starts with a newline
instead (model/tokenizer.py writes the prompt side). Several calls in one answer follow each other
as turns of their own, each opened by `<|assistant|>`.

`grammar_for` turns tool_choice and response_format into the grammar the answer must follow (Lark
with JSON schemas inside, compiled by runtime/constrained.py); `ToolCallReader` reads an answer
back into OpenAI's `tool_calls` a token at a time, the same way streamed or not.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.constrained import GrammarCompiler

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parameters_of(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or NO_ARGUMENTS


def calls_lark(functions: list[dict[str, Any]], parallel: bool) -> str:
    """Lark rules `calls`: one call of any of the functions, or with `parallel` one or more, each
    after the first opened by <|assistant|>."""
    rules = [f"call_{i}: \"{f['name']}\\n\" {GrammarCompiler.lark_json(parameters_of(f))}" for i, f in enumerate(functions)]
    one = " | ".join(f"call_{i}" for i in range(len(functions)))
    return "\n".join(["calls: call (<|assistant|> call)*" if parallel else "calls: call",
                      f"call: {one}", *rules])


def grammar_for(functions: list[dict[str, Any]] | None, choice: str | None, parallel: bool,
                schema: dict[str, Any] | None) -> str | None:
    """The Lark grammar of an answer, or None where the answer is free.

    functions: the tools offered; choice: none | auto | required | a function's name; schema: the
    response_format's JSON schema (json_object: {"type": "object"}), for an answer in text."""
    if not functions or choice == "none":
        return None if schema is None else f"start: {GrammarCompiler.lark_json(schema)}"
    if choice not in ("auto", "required"):  # a named function: exactly one call of it
        return "start: " + f"\"{choice}\\n\" " + GrammarCompiler.lark_json(parameters_of(next(f for f in functions if f["name"] == choice)))
    if choice == "required":
        return "start: calls\n" + calls_lark(functions, parallel)
    if schema is None:
        return None  # auto, free text or calls: read back, not constrained
    return f"start: text | calls\ntext: \"\\n\" {GrammarCompiler.lark_json(schema)}\n" + calls_lark(functions, parallel)


@dataclass
class Piece:
    """What a token adds to the answer: content text, or a tool call's start (id, name) or arguments."""

    content: str = ""
    call: int | None = None  # the call's index
    id: str | None = None  # set on a call's first piece, with its name
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCallReader:
    """Reads an answer in GLM-4's tool format, text a token at a time (special tokens give no text,
    but their ids come along): the first line is empty (a text answer) or a function's name (a
    call, its arguments after the newline); `separator` (<|assistant|>) opens the next call. A first
    line that names no function, or cannot become one, makes the whole answer text."""

    functions: set[str]
    separator: int
    state: str = "start"  # start: reading the first line | name: the next call's | text | arguments
    pending: str = ""
    calls: list[dict[str, str]] = field(default_factory=list)  # id, name, arguments
    content: list[str] = field(default_factory=list)

    def feed(self, text: str, token: int | None) -> list[Piece]:
        if token == self.separator and self.state == "arguments":
            self.state, self.pending = "name", ""
            return []
        if self.state == "text":
            return self.text(text)
        if self.state == "arguments":
            return self.arguments(text)
        self.pending += text
        line, newline, rest = self.pending.partition("\n")
        if newline:
            if self.state == "start" and not line:
                self.state = "text"
                return self.text(rest)
            if line in self.functions:
                self.calls.append({"id": call_id(), "name": line, "arguments": ""})
                self.state = "arguments"
                call = self.calls[-1]
                return [Piece(call=len(self.calls) - 1, id=call["id"], name=line), *self.arguments(rest)]
        elif any(f.startswith(self.pending) for f in self.functions):
            return []  # still possibly a name
        if self.state == "name":  # after a call, what names no function is dropped: GLM-4 ends there
            self.state = "dropped"
            return []
        self.state = "text"
        text, self.pending = self.pending, ""
        return self.text(text)

    def text(self, text: str) -> list[Piece]:
        if not text:
            return []
        self.content.append(text)
        return [Piece(content=text)]

    def arguments(self, text: str) -> list[Piece]:
        if not text:
            return []
        self.calls[-1]["arguments"] += text
        return [Piece(call=len(self.calls) - 1, arguments=text)]

    def finish(self) -> list[Piece]:
        """The end of the answer: a first line still pending is text."""
        if self.state == "start" and self.pending:
            self.state = "text"
            text, self.pending = self.pending, ""
            return self.text(text)
        return []
