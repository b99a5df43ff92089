"""The OpenAI API shapes ``llmray serve`` speaks: requests are validated here, responses built here.

Why this shape:

* A request maps to :class:`GenerationParams`, the part the engine understands: ``max_tokens``
  (``max_completion_tokens`` for chat), ``temperature`` (0 = greedy), ``top_p``, ``seed``,
  ``stop`` (strings), and ``top_k`` as the one extension (as vLLM has it).
* A parameter that would change the answer but is not implemented (``n`` > 1, ``logprobs``,
  ``echo``, penalties, ``logit_bias``, tools, ...) is refused with a 400 naming it, never silently
  ignored. Other unknown fields (``user``, ``metadata``) are ignored, as OpenAI clients send them.
* Responses are plain dicts in OpenAI's layout; :class:`Reply` builds every shape of one request
  (whole answer, stream chunk, usage chunk) so ids and timestamps agree. A stream is a series of
  server-sent events ``data: {...}\\n\\n`` closed by ``data: [DONE]\\n\\n``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SSE_DONE = "data: [DONE]\n\n"
MAX_STOP_STRINGS = 16


class RequestError(ValueError):
    """A request the server refuses, answered as an OpenAI error with ``status``; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class GenerationParams:
    """What the engine needs from a request besides the prompt."""

    max_tokens: int | None = None  # None: as many as the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    # not implemented: refused unless absent, null or one of these values that mean "off"
    unsupported: ClassVar[dict[str, tuple]] = {
        "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,),
        "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
        "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},)}

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        for name, off in self.unsupported.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in off:
                raise ValueError(f"'{name}' is not supported by this server (got {value!r})")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def params(self) -> GenerationParams:
        return GenerationParams(
            max_tokens=self._max_tokens(), temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()))

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: continue raw text (or token ids). OpenAI's default is 16 tokens."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict[str, Any]:
        """``{"role", "content"}`` for :mod:`llmray.tokenizer.chat` (which checks the role).

        OpenAI's ``developer`` role is what the chat format calls ``system``; text parts are joined."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: the assistant's next turn, rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(cls: type[_GenerationRequest], body: bytes) -> _GenerationRequest:
    """A validated request, or a :class:`RequestError` naming the first bad field."""
    try:
        return cls.model_validate(json.loads(body or b"null"))
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not JSON: {exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise RequestError(f"{where}: {message}" if where else message,
                           param=str(error["loc"][0]) if error["loc"] else None) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(event: dict) -> str:
    """One server-sent event carrying ``event`` as JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


@dataclass
class Reply:
    """Every response shape of one request, chat or text completion, with one id and timestamp."""

    chat: bool
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            choice["delta"] = {**delta, "content": text} if text or first else delta
        else:
            choice["text"] = text
        return self._envelope(self._chunk_object, [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk that ``stream_options.include_usage`` asks for: no choices, the usage."""
        return self._envelope(self._chunk_object, [], usage=usage(prompt_tokens, completion_tokens))

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def model_list(model: str, created: int) -> dict:
    """``GET /v1/models``: the one model this application serves."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llmray"}]}
