"""The OpenAI wire format: request fields we validate (sampling, stop strings) and the JSON of
completions, chat completions and their server-sent-event chunks. Pure functions over typed
completions, so the Serve app holds routes and lifecycle only.

Every choice carries a `melo` field (which OpenAI clients keep aside as an extra): the edit that fired,
its block and distance, the scope decision (which rule decided, the edit weighed, its score and the bar),
and the snapshot version that answered (null edit on the base model)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from melo_ray.serving.decoding import SamplingParams
from melo_ray.serving.engine import Completion
from melo_ray.serving.requests import ApiError

MAX_STOPS = 4


def sampling_params(temperature: float | None, top_p: float | None, seed: int | None) -> SamplingParams:
    temperature = 0.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature must be 0..2, got {temperature}", "temperature")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise ApiError(400, "seed must fit in 64 bits", "seed")
    return SamplingParams(temperature, top_p, seed)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop sequences", "stop")
    return stops


def explanation(completion: Completion) -> dict[str, Any]:
    """Why this answer: the edit that fired (null on the base model), the scope decision behind it (the rule
    that decided, the edit weighed, its score and bar), and the snapshot version."""
    return {"edit_id": completion.edit_id, "block": completion.block, "distance": completion.distance,
            "scope": completion.scope, "snapshot_version": completion.version}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def usage(results: list[Completion]) -> dict[str, int]:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def fingerprint(result: Completion) -> str:
    return f"snapshot-v{result.version}" if result.version is not None else "base"


def completion_head(model: str) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}


def chat_head(model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def completion_response(head: dict[str, Any], results: list[Completion]) -> dict[str, Any]:
    return {
        **head,
        "choices": [{"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason,
                     "melo": explanation(r)} for i, r in enumerate(results)],
        "usage": usage(results), "system_fingerprint": fingerprint(results[0]),
    }


def completion_chunk(head: dict[str, Any], delta: str, done: Completion | None) -> bytes:
    choice: dict[str, Any] = {"text": delta, "index": 0, "logprobs": None,
                              "finish_reason": done.finish_reason if done else None}
    if done:
        choice["melo"] = explanation(done)
    return sse({**head, "choices": [choice], **({"usage": usage([done])} if done else {})})


def chat_response(head: dict[str, Any], result: Completion) -> dict[str, Any]:
    return {
        **head, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None, "melo": explanation(result)}],
        "usage": usage([result]), "system_fingerprint": fingerprint(result),
    }


def chat_chunk(head: dict[str, Any], delta_text: str, first: bool, done: Completion | None) -> bytes:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if delta_text:
        delta["content"] = delta_text
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": done.finish_reason if done else None}
    if done:
        choice["melo"] = explanation(done)
    return sse({**head, "object": "chat.completion.chunk", "choices": [choice],
                **({"usage": usage([done])} if done else {})})


DONE = sse("[DONE]")
