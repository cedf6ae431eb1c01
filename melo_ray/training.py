"""Train one staging LoRA block on one edit batch: loss on target tokens only.

Causal LMs take a fast path: the frozen layers below the first LoRA layer run once per batch and
their output is replayed every iteration, and logits are computed only at target positions (a
(targets x vocab) product instead of (batch x length x vocab)). Other families use the plain
forward with the model's own loss inputs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from melo_ray.backbones import Backbone
from melo_ray.config import TrainConfig
from melo_ray.records import EditRecord, RecordError

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class TrainStats:
    steps: int
    first_loss: float
    final_loss: float
    learned: float  # fraction of target tokens that are the argmax by the early-stop margin
    seconds: float
    fast_path: bool


@dataclass
class EditBatch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # causal / seq2seq: (B, T) token ids with IGNORE; classification: (B,)


def label_error(labels: list[str] | tuple[str, ...], target: str) -> str | None:
    """Why a classification backbone cannot learn `target` (None: it can)."""
    if target in labels:
        return None
    shown = list(labels[:20]) + (["..."] if len(labels) > 20 else [])
    return f"'{target}' is not one of the backbone's labels {shown}"


def in_formats(backbone: Backbone, records: list[EditRecord], formats: list[str] | tuple[str, ...]) -> list[EditRecord]:
    """Training rows of `records` in each format, their prompts rendered as the model will read them
    (pass them to build_batch with rendered=True): raw through the prompt template, chat as a user
    turn of the backbone's chat template, so an edit holds when a chat client asks the question."""
    rows: list[EditRecord] = []
    for fmt in formats:
        if fmt == "raw":
            rows += [dataclasses.replace(r, prompt=backbone.template_prompt(r.prompt)) for r in records]
        elif fmt == "chat":
            rows += [dataclasses.replace(r, prompt=backbone.chat_prompt(r.prompt)) for r in records]
        else:
            raise ValueError(f"train.formats: unknown format '{fmt}'")
    return rows


def length_error(record: EditRecord, max_chars: int) -> tuple[str, str] | None:
    """(field, why) when a record's prompt or target is longer than training accepts."""
    for name in ("prompt", "target"):
        size = len(getattr(record, name))
        if size > max_chars:
            return name, f"is {size:,} characters; the limit is {max_chars:,} (train.max_text_chars)"
    return None


def build_batch(backbone: Backbone, records: list[EditRecord], append_eos: bool, *, rendered: bool = False) -> EditBatch:
    """Tokenise prompts and targets so the loss covers exactly the target tokens (on the model's device).

    `rendered`: the prompts are already as the model reads them (in_formats); else format_prompt."""
    batch = _build_batch(backbone, records, append_eos, rendered)
    device = backbone.device
    if device.type == "cpu":
        return batch
    return EditBatch({k: v.to(device) for k, v in batch.inputs.items()}, batch.labels.to(device))


def _build_batch(backbone: Backbone, records: list[EditRecord], append_eos: bool, rendered: bool) -> EditBatch:
    tok = backbone.tokenizer
    prompts = [r.prompt if rendered else backbone.format_prompt(r.prompt) for r in records]
    eos = [tok.eos_token_id] if append_eos and tok.eos_token_id is not None else []
    if backbone.task == "classification":
        labels = backbone.labels or []
        for row, record in enumerate(records):
            if problem := label_error(labels, record.target):
                raise RecordError("edit batch", row, "target", problem)
        inputs = dict(backbone.tokenize(prompts, return_tensors="pt", padding=True))
        return EditBatch(inputs, torch.tensor([labels.index(r.target) for r in records]))
    if backbone.task == "seq2seq":
        inputs = dict(backbone.tokenize(prompts, return_tensors="pt", padding=True))
        targets = [backbone.tokenize(r.target, add_special_tokens=False).input_ids + eos for r in records]
        width = max(len(t) for t in targets)
        labels = torch.full((len(records), width), IGNORE)
        for row, ids in enumerate(targets):
            labels[row, : len(ids)] = torch.tensor(ids)
        return EditBatch(inputs, labels)
    sequences, label_rows = [], []
    for prompt, record in zip(prompts, records):
        prompt_ids = backbone.tokenize(prompt).input_ids
        # The target follows the prompt after one space, the way a reader would write it.
        text = record.target if prompt.endswith((" ", "\n")) or record.target.startswith(" ") else " " + record.target
        target_ids = backbone.tokenize(text, add_special_tokens=False).input_ids + eos
        sequences.append(prompt_ids + target_ids)
        label_rows.append([IGNORE] * len(prompt_ids) + target_ids)
    width = max(len(s) for s in sequences)
    pad = tok.pad_token_id
    input_ids = torch.full((len(records), width), pad)
    attention = torch.zeros((len(records), width), dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE)
    for row, (seq, lab) in enumerate(zip(sequences, label_rows)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return EditBatch({"input_ids": input_ids, "attention_mask": attention}, labels)


class _StopForward(Exception):
    pass


def _first_output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


class _CachedPrefix:
    """Replays the LoRA-carrying top of a causal LM on cached inputs of its first LoRA block."""

    def __init__(self, backbone: Backbone, lora_names: list[str], batch: EditBatch) -> None:
        spec = backbone.family
        model = backbone.model
        assert spec.blocks and spec.final_norm and spec.lm_head
        self.blocks: nn.ModuleList = model.get_submodule(spec.blocks)  # type: ignore[assignment]
        self.norm = model.get_submodule(spec.final_norm)
        self.head = model.get_submodule(spec.lm_head)
        prefix = spec.blocks + "."
        self.first = min(int(n[len(prefix):].split(".")[0]) for n in lora_names)
        captured: dict[str, object] = {}

        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        handle = self.blocks[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**batch.inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        args, kwargs = captured["args"], dict(captured["kwargs"])  # type: ignore[arg-type]
        if args:
            self.hidden, self.rest = args[0], args[1:]
        else:
            self.hidden, self.rest = kwargs.pop("hidden_states"), ()
        self.kwargs = kwargs
        # Position t predicts the token at t+1: gather hidden states one before each target token.
        rows, cols = torch.nonzero(batch.labels[:, 1:] != IGNORE, as_tuple=True)
        self.rows, self.cols = rows, cols
        self.targets = batch.labels[:, 1:][rows, cols]

    def logits(self) -> torch.Tensor:
        hidden = self.hidden
        for block in self.blocks[self.first :]:
            hidden = _first_output(block(hidden, *self.rest, **self.kwargs))
        hidden = self.norm(hidden[self.rows, self.cols])
        return self.head(hidden)


def _supports_cached_prefix(backbone: Backbone, lora_names: list[str]) -> bool:
    spec = backbone.family
    if backbone.task != "causal_lm" or not (spec.blocks and spec.final_norm and spec.lm_head):
        return False
    return all(n.startswith(spec.blocks + ".") for n in lora_names)


def _full_forward(backbone: Backbone, batch: EditBatch) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Plain forward of the whole model; returns (logits at target positions, target ids)."""
    model = backbone.model
    labels = batch.labels
    if backbone.task == "classification":
        return (lambda: model(**batch.inputs).logits), labels
    if backbone.task == "seq2seq":
        decoder_labels = labels.clone()
        mask = decoder_labels != IGNORE
        rows, cols = torch.nonzero(mask, as_tuple=True)

        def seq2seq_logits() -> torch.Tensor:
            out = model(**batch.inputs, labels=decoder_labels.masked_fill(~mask, backbone.tokenizer.pad_token_id))
            return out.logits[rows, cols]

        return seq2seq_logits, labels[rows, cols]
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)

    def causal_logits() -> torch.Tensor:
        return model(**batch.inputs, use_cache=False).logits[rows, cols]

    return causal_logits, labels[:, 1:][rows, cols]


def _learned_fraction(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> float:
    with torch.no_grad():
        target_logit = logits.gather(1, targets[:, None]).squeeze(1)
        others = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
        return float((target_logit - others >= margin).float().mean())


def train_block(
    backbone: Backbone,
    batch: EditBatch,
    params: list[nn.Parameter],
    cfg: TrainConfig,
    *,
    trained_modules: list[str],
    active: Callable[[], AbstractContextManager],
    extra_loss: Callable[[], tuple[torch.Tensor, bool]] | None = None,
) -> TrainStats:
    """Optimise `params` for cfg.num_iter steps, or until every target is learned.

    `trained_modules` names the modules that hold `params` (the frozen prefix below the first of them
    is cached); `active` is the context in which the forward uses them (e.g. a staging route).
    `extra_loss` (e.g. ELDER's guided loss) returns a loss to add and whether its goal is met; early
    stopping then waits for both.
    """
    started = time.perf_counter()
    names = trained_modules
    fast = cfg.cache_frozen_prefix and _supports_cached_prefix(backbone, names)
    if fast:
        prefix = _CachedPrefix(backbone, names, batch)
        compute_logits, targets = prefix.logits, prefix.targets
    else:
        compute_logits, targets = _full_forward(backbone, batch)
    optimiser = torch.optim.Adam(params, lr=cfg.lr)
    first_loss = final_loss = float("nan")
    learned = 0.0
    steps = 0
    with active():
        for step in range(cfg.num_iter):
            logits = compute_logits()
            loss = F.cross_entropy(logits, targets)
            final_loss = float(loss.detach())
            if step == 0:
                first_loss = final_loss
            learned = _learned_fraction(logits, targets, cfg.early_stop_margin)
            extra_met = True
            if extra_loss is not None:
                extra, extra_met = extra_loss()
                loss = loss + extra
            if cfg.early_stop and learned >= 1.0 and extra_met:
                break
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1
        else:
            with torch.no_grad():
                logits = compute_logits()
                final_loss = float(F.cross_entropy(logits, targets))
                learned = _learned_fraction(logits, targets, cfg.early_stop_margin)
    return TrainStats(steps, first_loss, final_loss, learned, time.perf_counter() - started, fast)
