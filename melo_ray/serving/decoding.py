"""Continuous batching for a causal LM under an editor's routing: one KV-cached forward per decode
step for every running row, whatever edits they use.

Rows join between steps (their prompts are prefilled together, and their caches are padded on the
left to the running batch's length), and a row that finishes (end of sequence, its token budget, a
stop string, or its client gone) leaves the batch at once, so it stops costing compute. Each row
keeps the routing it was admitted with for its whole life, and samples with its own generator
(temperature, top_p, seed), so neither other rows nor sampling move which edit fires.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from melo_ray.editors.protocol import Editor
from melo_ray.editors.routing import Routing
from melo_ray.inference import cache_keyword
from melo_ray.text import cut_at_stop


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Sequence:
    """One request being decoded. `emit(sequence, delta, finished)` receives its text as it grows."""

    prompt_ids: list[int]
    max_new_tokens: int
    routing: Routing  # one row
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    emit: Callable[["Sequence", str, bool], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False
    generator: torch.Generator | None = None
    min_new_tokens: int = 0  # end of sequence is held off until then (like-for-like benchmarks)
    owner: Any = field(default=None, repr=False)  # whoever submitted it (the batcher's ticket)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sample_next(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token of one row: argmax at temperature 0, else nucleus sampling."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeLoop:
    """The running batch of one replica. Not thread-safe: one thread calls admit() and step()."""

    def __init__(self, editor: Editor, max_batch: int = 32) -> None:
        if editor.backbone.task != "causal_lm":
            raise ValueError("continuous batching serves causal language models")
        self.editor = editor
        self.max_batch = max_batch
        self.rows: list[Sequence] = []
        self.cache = None  # transformers DynamicCache, rows aligned with self.rows
        self.mask: torch.Tensor | None = None  # (rows, cached length) 1 = real token
        self.routing: Routing = Routing.base(0)  # of self.rows, rebuilt only when rows join or leave
        self.cache_keyword = cache_keyword(editor.backbone.model)
        tok = editor.backbone.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def _routing(self, rows: list[Sequence]) -> Routing:
        return Routing.concat([r.routing for r in rows])

    @torch.no_grad()
    def admit(self, new: list[Sequence]) -> None:
        """Prefill `new` together, take each one's first token, and add them to the running batch."""
        if not new:
            return
        device = self.editor.backbone.device
        width = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, seq in enumerate(new):  # left padding: every prompt ends at the right edge
            ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids):] = 1
            if seq.sampling.temperature > 0 and seq.generator is None:
                seed = seq.sampling.seed if seq.sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
                seq.generator = torch.Generator().manual_seed(seed)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.editor.routed(self._routing(new)):
            out = self.editor.backbone.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                             position_ids=positions.to(device), use_cache=True,
                                             logits_to_keep=1)  # only the last position's logits are read
        self._merge(getattr(out, self.cache_keyword), mask.to(device), new)
        self._advance(new, out.logits[:, -1])

    def _merge(self, cache, mask: torch.Tensor, new: list[Sequence]) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.rows = cache, mask, list(new)
            self.routing = self._routing(self.rows)
            return
        assert self.mask is not None
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length - old_len, 2), _pad_left(theirs.keys, length - new_len, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length - old_len, 2),
                                     _pad_left(theirs.values, length - new_len, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length - old_len, 1), _pad_left(mask, length - new_len, 1)])
        self.rows += new
        self.routing = self._routing(self.rows)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row; finished rows leave the batch."""
        self._drop_finished()
        if not self.rows:
            return
        assert self.mask is not None
        device = self.editor.backbone.device
        last = torch.tensor([[s.tokens[-1]] for s in self.rows], device=device)
        positions = self.mask.sum(-1, keepdim=True)  # real tokens so far = the next position
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        with self.editor.routed(self.routing):
            out = self.editor.backbone.model(input_ids=last, attention_mask=self.mask, position_ids=positions,
                                             use_cache=True, **{self.cache_keyword: self.cache})
        self.cache = getattr(out, self.cache_keyword)
        self._advance(self.rows, out.logits[:, -1])
        self._drop_finished()

    def clear(self) -> None:
        """Forget every running row (after a failed step; their owners were told)."""
        self.rows, self.cache, self.mask, self.routing = [], None, None, Routing.base(0)

    def _advance(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        tokenizer = self.editor.backbone.tokenizer
        greedy = logits.argmax(-1).tolist()  # one device round trip for every greedy row of the step
        for seq, row_logits, best in zip(rows, logits, greedy):
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                self._emit(seq)
                continue
            if seq.sampling.temperature <= 0 and not (best == self.eos and len(seq.tokens) < seq.min_new_tokens):
                token = best
            else:
                if len(seq.tokens) < seq.min_new_tokens:
                    row_logits = row_logits.clone()
                    row_logits[self.eos] = float("-inf")
                token = sample_next(row_logits, seq.sampling, seq.generator)
            if token == self.eos:
                seq.finish_reason = "stop"
            else:
                seq.tokens.append(token)
                seq.text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
                seq.text, stopped = cut_at_stop(seq.text, seq.stop)
                if stopped:
                    seq.finish_reason = "stop"
                elif len(seq.tokens) >= seq.max_new_tokens:
                    seq.finish_reason = "length"
            self._emit(seq)

    def _emit(self, seq: Sequence) -> None:
        if seq.emit is None:
            return
        end = len(seq.text)
        if not seq.finished:  # hold back what a stop string or a split character may still change
            end -= max((len(s) for s in seq.stop), default=1) - 1
            while end > seq.emitted and seq.text[end - 1] == "\ufffd":
                end -= 1
        if end > seq.emitted or seq.finished:
            delta, seq.emitted = seq.text[seq.emitted : max(end, seq.emitted)], max(end, seq.emitted)
            seq.emit(seq, delta, seq.finished)

    def _drop_finished(self) -> None:
        for seq in self.rows:
            if seq.cancelled and not seq.finished:
                seq.finish_reason = "cancelled"
                self._emit(seq)
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.routing = self.routing.take(keep)
        if not self.rows:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None and self.cache is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns no remaining row uses
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def run_to_completion(loop: DecodeLoop, sequences: list[Sequence]) -> None:
    """Decode `sequences` (admitted as slots free up) until every one has finished."""
    waiting = list(sequences)
    while waiting or loop.rows:
        take = loop.free
        if waiting and take > 0:
            loop.admit(waiting[:take])
            waiting = waiting[take:]
        loop.step()
