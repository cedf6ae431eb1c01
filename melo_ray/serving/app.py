"""Ray Serve app: the edited model behind HTTP, following a snapshot store.

Each replica loads the backbone once, installs the latest snapshot of a store (or of one snapshot
folder, as `melo-ray edit --out` writes it), and keeps a polling task (started from `reconfigure`,
Serve's hook for the deployment's user_config) that installs newer versions as they are published
(or the version a store's PIN.json names). A decode thread per replica (serving/batcher.py) runs
continuous batching: requests join between decode steps and leave when they finish; an install lets
the running requests finish on the version they started with, then swaps. Reading and verifying a
new version happens off that thread.

Routes: POST /v1/generate, POST /v1/completions and POST /v1/chat/completions (OpenAI-compatible,
streaming with server-sent events, sampling), GET /v1/models, GET /v1/version, GET /healthz. Start it
with `melo-ray serve`, or as a RayService with import path `melo_ray.serving.app:app_builder`.
"""

import asyncio
import dataclasses
import logging
import os
import socket
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
import torch

from melo_ray.config import load_config
from melo_ray.serving import openai_format as oai
from melo_ray.serving.batcher import Batcher, Ticket, Update
from melo_ray.serving.decoding import SamplingParams
from melo_ray.serving.engine import Completion, CompletionRequest, ServingEngine
from melo_ray.serving.follower import SnapshotFollower
from melo_ray.serving.requests import ApiError, ChatBody, CompletionsBody, GenerateBody, check_bearer, parse_body
from melo_ray.snapshots import SnapshotError
from melo_ray.store import SnapshotFolder, SnapshotStore, open_snapshots

log = logging.getLogger(__name__)
TOKEN_ENV = "MELO_RAY_API_TOKEN"


class ServeSettings(BaseModel):
    """Everything a replica needs; also the `args` of the RayService's app builder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    snapshots: str = Field(..., description="Snapshot store root or one snapshot folder (local path or pyarrow.fs URI).")
    config: str | None = Field(None, description="Editor YAML; needed while the store has no snapshot yet.")
    model_name: str = "melo-ray"
    poll_interval_s: float = Field(1.0, gt=0, description="How often a replica looks for a newer version.")
    max_prompts: int = Field(32, ge=1, description="Prompts per /v1/generate or /v1/completions request.")
    max_new_tokens: int = Field(256, ge=1, description="Largest max_new_tokens / max_tokens accepted.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest prompt accepted, in tokens.")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Larger request bodies get 413.")
    max_batch_size: int = Field(32, ge=1, description="Rows decoded together (continuous batching).")
    api_token: str | None = Field(None, description=f"Bearer token for every route but /healthz; default ${TOKEN_ENV}.")
    replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)


def _unreachable(exc: BaseException) -> bool:
    """A read that failed because the store could not be reached (an OSError behind it), not because
    what it holds is bad: such a version is tried again, never refused."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            return True
        cause = cause.__cause__
    return False


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


api = FastAPI(title="melo-ray")  # the route table Serve's ingress wraps; no state lives on it


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param)


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
    return parse_body(await request.body(), model, limit)


@dataclasses.dataclass(frozen=True)
class ReplicaStart:
    """What a replica starts with: the source it follows, its engine, and the versions it found bad."""

    source: SnapshotStore | SnapshotFolder
    engine: ServingEngine
    refused: dict[int, str]  # version -> why it failed verification


def start_engine(settings: ServeSettings) -> ReplicaStart:
    """The snapshot source a replica follows (a store, or one snapshot folder) and its engine on the
    version the store names, or, when that one fails verification, the newest older version that
    passes (a replica started after a bad publish still comes up); the base model only while a store
    is still empty and a config is given."""
    source = open_snapshots(settings.snapshots)
    wanted = source.serving_version()
    refused: dict[int, str] = {}
    if wanted is not None:
        older = sorted((v for v in source.versions() if v < wanted), reverse=True) \
            if isinstance(source, SnapshotStore) else []
        for version in [wanted, *older]:
            try:
                manifest, files = source.read(version)
                return ReplicaStart(source, ServingEngine.from_snapshot(manifest, files), refused)
            except SnapshotError as exc:
                if _unreachable(exc):
                    raise
                refused[version] = str(exc)
                log.error("snapshot version %s fails verification (%s); trying the one before", version, exc)
        raise SnapshotError(f"{settings.snapshots}: no kept version passes verification: {refused}")
    if not settings.config:
        raise SnapshotError(f"{settings.snapshots}: no snapshot yet (neither a store with LATEST.json nor a "
                            "snapshot folder with manifest.json), and no config to serve the base model")
    # Said loudly and in every answer (snapshot_version null, /v1/version "serving"): until a job
    # publishes into this store, requests run on the unedited model.
    log.warning("%s has no published snapshot yet: serving the BASE model of %s until one appears",
                settings.snapshots, settings.config)
    return ReplicaStart(source, ServingEngine(load_config(settings.config)), refused)


def describe_serving(settings: ServeSettings, version: int | None) -> str:
    if version is not None:
        return f"snapshot v{version}"
    return f"base model: {settings.snapshots} has no published snapshot yet"


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class MeloServer:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(settings)
        self.token = self.settings.api_token or os.environ.get(TOKEN_ENV) or None
        # One torch thread per CPU the replica holds: more threads than cores spin against each other.
        torch.set_num_threads(max(1, int(self.settings.replica_cpus)))
        start = start_engine(self.settings)
        self.store, self.engine = start.source, start.engine
        self.replica = uuid.uuid4().hex[:8]
        # Continuous batching (rows join between decode steps, finished rows leave) is ours:
        # @serve.batch can only hand over whole batches.
        self.batcher = Batcher(self.engine, self.settings.max_batch_size)
        self.poll_interval = self.settings.poll_interval_s
        self.pinned: int | None = None
        self.follower = SnapshotFollower(self.store)
        self.follower.started(self.engine.version)
        for version, reason in start.refused.items():
            self.follower.refuse(version, reason)
        if start.refused:  # the store names a version this replica could not verify: it is behind
            self.follower.latest_seen = max(start.refused)
        self.poller: asyncio.Task | None = None
        log.info("replica %s serving version %s", self.replica, self.engine.version)

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.stop()

    # -- snapshots -------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """user_config: {"poll_interval_s": float, "pin_version": int | null}."""
        self.poll_interval = float(user_config.get("poll_interval_s", self.settings.poll_interval_s))
        self.pinned = user_config.get("pin_version")
        if self.pinned is not None:
            await self._install(int(self.pinned))
        if self.poller is None or self.poller.done():
            self.poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if self.pinned is not None:
                continue
            wanted = await asyncio.to_thread(self.follower.poll, self.engine.version)  # never raises
            if wanted is None:
                continue
            try:
                await self._install(wanted)
            except Exception:  # a bad version must not stop the replica; keep serving the current one
                log.exception("replica %s: could not install version %s", self.replica, wanted)

    async def _install(self, version: int) -> None:
        try:
            manifest, files = await asyncio.to_thread(self.store.read, version)  # verified, off the decode thread
        except SnapshotError as exc:
            if _unreachable(exc):  # the store went away mid-read: try again at the next poll
                self.follower.reachable, self.follower.last_error = False, f"store unreachable: {exc}"
            else:
                self.follower.refuse(version, str(exc))
            raise
        # the batcher lets running requests finish on their version, then swaps, then admits again
        try:
            await asyncio.wrap_future(self.batcher.install(manifest, files))
        except SnapshotError as exc:  # verified files that do not fit this replica (another editor, base)
            self.follower.refuse(version, str(exc))
            raise
        self.follower.installed()
        log.info("replica %s now serves version %s", self.replica, version)

    # -- generation ------------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.token)

    def _max_new(self, max_new: int) -> int:
        if max_new < 1 or max_new > self.settings.max_new_tokens:
            raise ApiError(400, f"max tokens must be 1..{self.settings.max_new_tokens}, got {max_new}")
        return max_new

    def _request(self, prompt: str, max_new: int, stop: tuple[str, ...], field: str, index: int,
                 sampling: SamplingParams = SamplingParams(), model_input: str | None = None) -> CompletionRequest:
        if not prompt.strip():
            raise ApiError(400, f"prompt {index} is empty", field)
        request = CompletionRequest(prompt, self._max_new(max_new), stop, None, sampling, model_input)
        ids = tuple(self.engine.model_input_ids(request))
        if len(ids) > self.settings.max_prompt_tokens:
            raise ApiError(400, f"prompt {index} is longer than {self.settings.max_prompt_tokens} tokens", field)
        return dataclasses.replace(request, prompt_tokens=len(ids), input_ids=ids)

    def _requests(self, prompts: list[str], max_new: int, stop: tuple[str, ...], field: str,
                  sampling: SamplingParams = SamplingParams()) -> list[CompletionRequest]:
        if not prompts:
            raise ApiError(400, f"'{field}' is empty", field)
        if len(prompts) > self.settings.max_prompts:
            raise ApiError(413, f"{len(prompts)} prompts; the limit is {self.settings.max_prompts}", field)
        return [self._request(p, max_new, stop, field, i, sampling) for i, p in enumerate(prompts)]

    def _submit(self, request: CompletionRequest, stream: bool) -> tuple[Ticket, asyncio.Queue]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        ticket = self.batcher.submit(request, lambda update: loop.call_soon_threadsafe(queue.put_nowait, update),
                                     stream=stream)
        return ticket, queue

    async def _updates(self, request: CompletionRequest, *, stream: bool = True):
        """The request's text as it is decoded; leaving early (a client gone) frees its row."""
        ticket, queue = self._submit(request, stream)
        finished = False
        try:
            while not finished:
                update: Update = await queue.get()
                if update.error is not None:
                    raise ApiError(500, f"generation failed: {update.error}")
                finished = update.completion is not None
                yield update
        finally:
            if not finished:
                ticket.cancel()

    async def _complete(self, request: CompletionRequest) -> Completion:
        async for update in self._updates(request, stream=False):
            if update.completion is not None:
                return update.completion
        raise ApiError(500, "generation ended without a result")

    async def _run(self, requests: list[CompletionRequest]) -> list[Completion]:
        return list(await asyncio.gather(*(self._complete(r) for r in requests)))

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Open to probes. `status` stays "ok" while the replica answers; `freshness` says whether it
        serves an older version than the store names, or cannot reach the store, and since when."""
        freshness = self.follower.freshness(self.engine.version)
        status = "ok" if freshness.store_reachable and not freshness.behind else "stale"
        return {"status": status, "snapshot_version": self.engine.version, "freshness": freshness.as_json()}

    def check_health(self) -> None:  # Serve's replica health check
        if self.poller is not None and self.poller.done() and not self.poller.cancelled():
            raise RuntimeError(f"snapshot poller stopped: {self.poller.exception()}")
        if not self.batcher.thread.is_alive():
            raise RuntimeError("the decode thread stopped")

    @api.get("/v1/version")
    async def version(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        backbone = self.engine.editor.config.backbone
        return {
            "snapshot_version": self.engine.version, "serving": describe_serving(self.settings, self.engine.version),
            "editor": self.engine.editor.name, "edits": self.engine.stats.get("edits", 0), "stats": self.engine.stats,
            "clusters": self.engine.stats.get("clusters", 0), "blocks": self.engine.stats.get("blocks", 0),
            "backbone": {"source": backbone.source, "family": backbone.family, "path": backbone.path},
            "model": self.settings.model_name, "replica": self.replica, "pid": os.getpid(),
            "host": socket.gethostname(), "decode": self.batcher.stats(),
            "pinned": self.pinned, "freshness": self.follower.freshness(self.engine.version).as_json(),
        }

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "owned_by": "melo-ray"}]}

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        body = await _parse(request, GenerateBody, self.settings.max_body_bytes)
        max_new = body.max_new_tokens or self.engine.editor.config.generate.max_new_tokens
        results = await self._run(self._requests(body.prompts, max_new, (), "prompts"))
        return {
            "outputs": [
                {"prompt": p, "output": r.text.strip(), "block": r.block, "distance": r.distance,
                 "edit_id": r.edit_id, "scope": r.scope, "snapshot_version": r.version,
                 "finish_reason": r.finish_reason}
                for p, r in zip(body.prompts, results)
            ],
            "replica": self.replica,
        }

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"model '{model}' is not served here; use '{self.settings.model_name}'", "model")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._check_auth(request)
        body = await _parse(request, CompletionsBody, self.settings.max_body_bytes)
        self._check_model(body.model)
        if body.n not in (None, 1):
            raise ApiError(400, "n must be 1", "n")
        if body.logprobs is not None or body.echo:
            raise ApiError(400, "logprobs and echo are not supported", "logprobs" if body.logprobs is not None else "echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        sampling = oai.sampling_params(body.temperature, body.top_p, body.seed)
        requests = self._requests(prompts, 16 if body.max_tokens is None else body.max_tokens,
                                  oai.stop_strings(body.stop), "prompt", sampling)
        head = oai.completion_head(self.settings.model_name)
        if body.stream:
            if len(requests) != 1:
                raise ApiError(400, "streaming serves one prompt per request", "prompt")
            return StreamingResponse(self._stream_completion(requests[0], head), media_type="text/event-stream")
        return oai.completion_response(head, await self._run(requests))

    async def _stream_completion(self, request: CompletionRequest, head: dict[str, Any]):
        async for update in self._updates(request):
            yield oai.completion_chunk(head, update.delta, update.completion)
        yield oai.DONE

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._check_auth(request)
        body = await _parse(request, ChatBody, self.settings.max_body_bytes)
        self._check_model(body.model)
        if body.n not in (None, 1):
            raise ApiError(400, "n must be 1", "n")
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", "logprobs")
        if not body.messages:
            raise ApiError(400, "'messages' is empty", "messages")
        users = [m.text() for m in body.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "a chat needs at least one user message", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            model_input = self.engine.chat_input(messages)
        except Exception as exc:  # a template that rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template cannot render these messages: {exc}", "messages") from exc
        max_new = body.max_completion_tokens or body.max_tokens or self.engine.editor.config.generate.max_new_tokens
        # routing follows the question (the last user message), never the system prompt or the template
        chat = self._request(users[-1], max_new, oai.stop_strings(body.stop), "messages", 0,
                             oai.sampling_params(body.temperature, body.top_p, body.seed), model_input)
        head = oai.chat_head(self.settings.model_name)
        if body.stream:
            return StreamingResponse(self._stream_chat(chat, head), media_type="text/event-stream")
        return oai.chat_response(head, await self._complete(chat))

    async def _stream_chat(self, request: CompletionRequest, head: dict[str, Any]):
        first = True
        async for update in self._updates(request):
            yield oai.chat_chunk(head, update.delta, first, update.completion)
            first = False
        yield oai.DONE


def build_app(settings: ServeSettings) -> Any:
    """The Serve application for these settings."""
    return MeloServer.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        user_config={"poll_interval_s": settings.poll_interval_s, "pin_version": None},
    ).bind(settings.model_dump())


def app_builder(args: dict[str, Any]) -> Any:
    """Import path for `serve run` / RayService: melo_ray.serving.app:app_builder."""
    return build_app(ServeSettings.model_validate(args))


def run_http(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, *, blocking: bool = True) -> None:
    """Start Serve's HTTP proxy on host:port and deploy the app (Ray must be initialised)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name="melo-ray", route_prefix="/", blocking=blocking)
