"""HTTP request bodies: size, JSON, depth and text checks, then typed models. Every failure is an
ApiError with a 4xx status and the field it concerns; nothing a client sends reaches the engine
unchecked."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

MAX_DEPTH = 32  # our bodies nest 3 deep; anything far deeper is not a request of ours


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def __reduce__(self):
        return (type(self), (self.status, self.message, self.param))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateBody(_Strict):
    prompts: list[StrictStr]
    max_new_tokens: StrictInt | None = None


class CompletionsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = 16
    temperature: float | None = 0.0  # greedy unless asked otherwise
    top_p: float | None = 1.0
    seed: StrictInt | None = None
    n: StrictInt | None = 1
    stream: bool | None = False
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: StrictInt | None = None
    echo: bool | None = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...

    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" or part.text is None for part in self.content):
            raise ApiError(400, "only text content parts are served", "messages")
        return "".join(part.text or "" for part in self.content)


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = 0.0
    top_p: float | None = 1.0
    seed: StrictInt | None = None
    n: StrictInt | None = 1
    stream: bool | None = False
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: bool | None = False


def _first_problem(data: Any) -> tuple[str, str] | None:
    """(path, problem) of the first value nested too deeply or holding text that is not valid
    Unicode (a lone surrogate from a JSON \\udXXX escape); walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path or "(body)", f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(body)", "holds a lone surrogate (\\udXXX escape), which is not valid Unicode text"
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "(body)", "has a key that is not valid Unicode text"
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i), depth + 1) for i, item in enumerate(value))
    return None


def parse_body(body: bytes, model: type[BaseModel], limit: int) -> Any:
    """A request body as `model`, or ApiError: 413 over `limit` bytes, 400 for bodies that are not
    a JSON object of valid text within MAX_DEPTH, 422 for fields of the wrong shape."""
    if len(body) > limit:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {limit}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # the C scanner gives up on very deep nesting
        raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    problem = _first_problem(data)
    if problem is not None:
        field, reason = problem
        raise ApiError(400, f"field '{field}': {reason}", field)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"field '{field}': {first['msg']}", field) from exc


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Every route but /healthz needs `Authorization: Bearer <token>` when the server has a token."""
    if token is None:
        return
    if authorization != f"Bearer {token}":
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
