"""What one serving replica does, without Ray: route, decode a mixed-edit batch, swap snapshots.

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
from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.editors.registry import build_editor
from melo_ray.inference import generate_token_ids
from melo_ray.serving.decoding import DecodeLoop, SamplingParams, Sequence, run_to_completion
from melo_ray.snapshots import check_editor
from melo_ray.text import cut_at_stop


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str  # what routing sees (chat: the last user message); the model sees it through the prompt template
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    prompt_tokens: int | None = None  # when the caller has counted them already
    sampling: SamplingParams = SamplingParams()
    model_input: str | None = None  # the exact text the model reads (chat: the rendered template), if not `prompt`
    min_new_tokens: int = 0  # benchmarks: hold off end-of-sequence for like-for-like timing
    input_ids: tuple[int, ...] | None = None  # the model input already tokenized (the server counts it anyway)


@dataclass(frozen=True)
class Completion:
    text: str
    block: int | None  # the edit the editor's routing chose (MELO: LoRA block; ELDER: 0 = the mixture); None: base
    distance: float | None  # behind that choice (MELO: to the nearest cluster centre; ELDER: Hamming distance)
    version: int | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string), "length" or "cancelled"
    edit_id: str | None = None  # the edit that fired, where the editor can tell
    scope: dict[str, Any] | None = None  # the scope decision (ScopeDecision.to_json), where the editor gives one


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
        where = f"snapshot v{manifest.get('version')}"
        check_editor(manifest.get("editor"), self.editor.name, where, "this replica serves the latter")
        self.editor.restore_files(manifest, files, where)  # raises before any change
        self.version = int(manifest["version"])
        self.stats = dict(manifest.get("stats", {}))

    def model_input_ids(self, request: CompletionRequest) -> list[int]:
        if request.input_ids is not None:
            return list(request.input_ids)
        backbone = self.editor.backbone
        text = request.model_input if request.model_input is not None else backbone.format_prompt(request.prompt)
        return backbone.tokenize(text)["input_ids"]

    def chat_input(self, messages: list[dict[str, str]]) -> str:
        """The backbone's own chat template, ready for the assistant's turn."""
        tokenizer = self.editor.backbone.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this backbone's tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def routing(self, requests: list[CompletionRequest], *, base: bool = False) -> Routing:
        """One routing call for a batch of requests, fixed for their whole generation."""
        if base or self.version is None:
            return Routing.base(len(requests))
        return self.editor.routing([r.prompt for r in requests])

    def sequences(self, requests: list[CompletionRequest], emit=None, *, base: bool = False) -> list[Sequence]:
        """Requests as decode-loop rows (routing computed now, in one batch)."""
        routing = self.routing(requests, base=base)
        return [Sequence(self.model_input_ids(r), r.max_new_tokens, routing.take([i]), r.sampling, r.stop, emit,
                         min_new_tokens=r.min_new_tokens)
                for i, r in enumerate(requests)]

    def completion(self, request: CompletionRequest, seq: Sequence) -> Completion:
        """What a finished row answers, with which edit fired and the snapshot version."""
        block, distance, edit_id = seq.routing.row(0)
        decision = seq.routing.decisions[0]
        return Completion(
            text=seq.text, block=block, distance=distance, version=self.version,
            prompt_tokens=request.prompt_tokens if request.prompt_tokens is not None else len(seq.prompt_ids),
            completion_tokens=len(seq.tokens), finish_reason=seq.finish_reason or "length", edit_id=edit_id,
            scope=decision.to_json() if decision is not None else None,
        )

    def complete(self, requests: list[CompletionRequest], *, base: bool = False, max_batch: int = 32) -> list[Completion]:
        """Decode a list of requests to the end (continuous batching, `max_batch` rows at a time)."""
        if not requests:
            return []
        if self.editor.backbone.task != "causal_lm":
            return self._complete_whole(requests, base=base)
        seqs = self.sequences(requests, base=base)
        run_to_completion(DecodeLoop(self.editor, max_batch), seqs)
        return [self.completion(r, s) for r, s in zip(requests, seqs)]

    def _complete_whole(self, requests: list[CompletionRequest], *, base: bool) -> list[Completion]:
        """Encoder-decoder backbones: transformers' generate over the whole batch, greedy."""
        editor = self.editor
        routing = self.routing(requests, base=base)
        longest = max(r.max_new_tokens for r in requests)
        with editor.routed(routing):
            rows = generate_token_ids(editor.backbone, [r.prompt for r in requests], longest)
        out = []
        for i, (request, row) in enumerate(zip(requests, rows)):
            seq = Sequence([], request.max_new_tokens, routing.take([i]), stop=request.stop)
            seq.tokens = row[: request.max_new_tokens]  # greedy decoding is prefix-consistent
            text = editor.backbone.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            seq.text, stopped = cut_at_stop(text, request.stop)
            seq.finish_reason = "stop" if stopped or len(seq.tokens) < request.max_new_tokens else "length"
            out.append(self.completion(request, seq))
        return out
