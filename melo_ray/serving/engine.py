"""What one serving replica does, without Ray: route, generate a mixed-block batch, swap snapshots.

The Serve deployment (melo_ray/serving/app.py) owns concurrency; this class is plain and synchronous so it
can be tested and benchmarked on its own.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from melo_ray.backbones import Backbone, load_backbone
from melo_ray.config import EditorConfig, load_config
from melo_ray.editors.protocol import Editor, Routing
from melo_ray.editors.registry import build_editor
from melo_ray.inference import generate_token_ids
from melo_ray.snapshots import SnapshotError


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    prompt_tokens: int | None = None  # when the caller has counted them already


@dataclass(frozen=True)
class Completion:
    text: str
    block: int | None  # the edit the editor's routing chose (MELO: LoRA block; ELDER: 0 = the mixture); None: base
    distance: float | None  # behind that choice (MELO: to the nearest cluster centre; ELDER: Hamming distance)
    version: int | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


def _apply_stops(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class ServingEngine:
    """An editor in serving mode. `version` is None while the base model is served (empty store)."""

    def __init__(self, config: EditorConfig, backbone: Backbone | None = None) -> None:
        self.editor: Editor = build_editor(config.editor, config, backbone or load_backbone(config.backbone))
        self.version: int | None = None
        self.stats: dict[str, Any] = {}

    @classmethod
    def from_snapshot(cls, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> "ServingEngine":
        config = load_config(manifest["config"])
        # The manifest names the editor that made it (an eval run may use any editor on one config).
        engine = cls(config.model_copy(update={"editor": manifest.get("editor", config.editor)}))
        engine.install(manifest, files)
        return engine

    def install(self, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
        """Swap in a verified snapshot (raises, keeping the current one, if it does not fit)."""
        if manifest.get("editor") != self.editor.name:
            raise SnapshotError(f"snapshot v{manifest.get('version')} is for editor '{manifest.get('editor')}'; "
                                f"this replica serves '{self.editor.name}'")
        self.editor.restore_files(manifest, files, f"snapshot v{manifest.get('version')}")  # raises before any change
        self.version = int(manifest["version"])
        self.stats = dict(manifest.get("stats", {}))

    def prompt_tokens(self, prompt: str) -> int:
        backbone = self.editor.backbone
        return len(backbone.tokenize(backbone.format_prompt(prompt))["input_ids"])

    def complete(self, requests: list[CompletionRequest], *, base: bool = False, full_length: bool = False) -> list[Completion]:
        """One routed forward pass per generated token for the whole batch, whatever blocks its rows use.

        Keys are computed once from each prompt and the routing is held fixed while generating.
        `full_length` generates every row to the longest max_new_tokens (for like-for-like timing)."""
        if not requests:
            return []
        editor = self.editor
        prompts = [r.prompt for r in requests]
        routing = Routing.base(len(prompts)) if base or self.version is None else editor.routing(prompts)
        longest = max(r.max_new_tokens for r in requests)
        with editor.routed(routing):
            rows = generate_token_ids(editor.backbone, prompts, longest, longest if full_length else 0)
        tokenizer = editor.backbone.tokenizer
        out = []
        for request, row, block, distance in zip(requests, rows, routing.ids, routing.distances):
            # greedy decoding is prefix-consistent, so a shorter request is the longer run cut short
            tokens = row[: request.max_new_tokens]
            text, stopped = _apply_stops(tokenizer.decode(tokens, skip_special_tokens=True), request.stop)
            ended = len(tokens) < request.max_new_tokens
            out.append(Completion(
                text=text, block=int(block) if block >= 0 else None,
                distance=float(distance) if np.isfinite(distance) else None, version=self.version,
                prompt_tokens=request.prompt_tokens if request.prompt_tokens is not None else self.prompt_tokens(request.prompt),
                completion_tokens=len(tokens),
                finish_reason="stop" if stopped or ended else "length",
            ))
        return out
