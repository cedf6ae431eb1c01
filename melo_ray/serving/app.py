"""Ray Serve app: the edited model behind HTTP, following a snapshot store.

Each replica loads the backbone once, installs the latest snapshot of a store (or of one snapshot
folder, as `melo-ray edit --out` writes it), and keeps a polling task
(started from `reconfigure`, Serve's hook for the deployment's user_config) that installs newer
versions as they are published. Generation and installation take the same asyncio lock, and a batch
holds it from routing to its last token, so a request always finishes on the version it started with
and no request waits on a half-installed snapshot. Reading and verifying a new version happens
outside the lock.

Routes: POST /v1/generate, POST /v1/completions (OpenAI-compatible), GET /v1/models, GET /v1/version,
GET /healthz. Start it with `melo-ray serve`, or as a RayService with import path
`melo_ray.serving.app:app_builder`.
"""

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from melo_ray.config import load_config
from melo_ray.serving.requests import ApiError, CompletionsBody, GenerateBody, parse_body
from melo_ray.serving.engine import Completion, CompletionRequest, ServingEngine
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
    max_batch_size: int = Field(32, ge=1, description="@serve.batch: prompts per forward pass.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch: wait to fill a batch.")
    api_token: str | None = Field(None, description=f"Bearer token for every route but /healthz; default ${TOKEN_ENV}.")
    replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)


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


def start_engine(settings: ServeSettings) -> tuple[SnapshotStore | SnapshotFolder, ServingEngine]:
    """The snapshot source a replica follows (a store, or one snapshot folder) and its engine on the
    latest version there; the base model only while a store is still empty and a config is given."""
    source = open_snapshots(settings.snapshots)
    latest = source.serving_version()
    if latest is not None:
        manifest, files = source.read(latest)
        return source, ServingEngine.from_snapshot(manifest, files)
    if not settings.config:
        raise SnapshotError(f"{settings.snapshots}: no snapshot yet (neither a store with LATEST.json nor a "
                            "snapshot folder with manifest.json), and no config to serve the base model")
    # Said loudly and in every answer (snapshot_version null, /v1/version "serving"): until a job
    # publishes into this store, requests run on the unedited model.
    log.warning("%s has no published snapshot yet: serving the BASE model of %s until one appears",
                settings.snapshots, settings.config)
    return source, ServingEngine(load_config(settings.config))


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
        self.store, self.engine = start_engine(self.settings)
        self.replica = uuid.uuid4().hex[:8]
        self.lock = asyncio.Lock()
        self.poll_interval = self.settings.poll_interval_s
        self.pinned: int | None = None
        self.refused: set[int] = set()
        self.poller: asyncio.Task | None = None
        self._generate_batch.set_max_batch_size(self.settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        log.info("replica %s serving version %s", self.replica, self.engine.version)

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
            try:
                latest = await asyncio.to_thread(self.store.serving_version)  # a store's PIN.json wins
                if latest is not None and latest != self.engine.version and latest not in self.refused:
                    await self._install(latest)
            except Exception:  # a bad version must not stop the replica; keep serving the current one
                log.exception("replica %s: could not install a newer snapshot", self.replica)

    async def _install(self, version: int) -> None:
        try:
            manifest, files = await asyncio.to_thread(self.store.read, version)  # verified, outside the lock
        except SnapshotError:
            self.refused.add(version)
            raise
        async with self.lock:  # waits for the running batch; the next batch sees the new version
            await asyncio.to_thread(self.engine.install, manifest, files)
        log.info("replica %s now serves version %s", self.replica, version)

    # -- generation ------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[CompletionRequest]) -> list[Completion]:
        async with self.lock:
            return await asyncio.to_thread(self.engine.complete, requests)

    def _check_auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.token}":
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    def _requests(self, prompts: list[str], max_new: int, stop: tuple[str, ...], field: str) -> list[CompletionRequest]:
        limits = self.settings
        if not prompts:
            raise ApiError(400, f"'{field}' is empty", field)
        if len(prompts) > limits.max_prompts:
            raise ApiError(413, f"{len(prompts)} prompts; the limit is {limits.max_prompts}", field)
        if max_new < 1 or max_new > limits.max_new_tokens:
            raise ApiError(400, f"max tokens must be 1..{limits.max_new_tokens}, got {max_new}")
        requests = []
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ApiError(400, f"prompt {i} is empty", field)
            count = self.engine.prompt_tokens(prompt)
            if count > limits.max_prompt_tokens:
                raise ApiError(400, f"prompt {i} is longer than {limits.max_prompt_tokens} tokens", field)
            requests.append(CompletionRequest(prompt, max_new, stop, count))
        return requests

    async def _run(self, requests: list[CompletionRequest]) -> list[Completion]:
        return list(await asyncio.gather(*(self._generate_batch(r) for r in requests)))

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "snapshot_version": self.engine.version}

    def check_health(self) -> None:  # Serve's replica health check
        if self.poller is not None and self.poller.done() and not self.poller.cancelled():
            raise RuntimeError(f"snapshot poller stopped: {self.poller.exception()}")

    @api.get("/v1/version")
    async def version(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        backbone = self.engine.editor.config.backbone
        return {
            "snapshot_version": self.engine.version, "serving": describe_serving(self.settings, self.engine.version), "editor": self.engine.editor.name,
            "edits": self.engine.stats.get("edits", 0), "stats": self.engine.stats,
            "clusters": self.engine.stats.get("clusters", 0), "blocks": self.engine.stats.get("blocks", 0),
            "backbone": {"source": backbone.source, "family": backbone.family, "path": backbone.path},
            "model": self.settings.model_name, "replica": self.replica,
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
                 "snapshot_version": r.version, "finish_reason": r.finish_reason}
                for p, r in zip(body.prompts, results)
            ],
            "replica": self.replica,
        }

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        body = await _parse(request, CompletionsBody, self.settings.max_body_bytes)
        if body.model is not None and body.model != self.settings.model_name:
            raise ApiError(404, f"model '{body.model}' is not served here; use '{self.settings.model_name}'", "model")
        if body.temperature not in (None, 0, 0.0):
            raise ApiError(400, "only greedy decoding is served: temperature must be 0", "temperature")
        if body.stream:
            raise ApiError(400, "streaming is not supported", "stream")
        if body.n not in (None, 1):
            raise ApiError(400, "n must be 1", "n")
        if body.logprobs is not None or body.echo:
            raise ApiError(400, "logprobs and echo are not supported", "logprobs" if body.logprobs is not None else "echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", "stop")
        results = await self._run(self._requests(prompts, body.max_tokens or 16, stop, "prompt"))
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [
                {"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                for i, r in enumerate(results)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": f"snapshot-v{results[0].version}" if results[0].version is not None else "base",
        }


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
