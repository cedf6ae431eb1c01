"""Train one staging LoRA block on one edit batch: loss on target tokens only.

Causal LMs take a fast path: the frozen layers below the first LoRA layer run once per batch and
their output is replayed every iteration, and logits are computed only at target positions (a
(targets x vocab) product instead of (batch x length x vocab)). Other families use the plain
forward with the model's own loss inputs. When each edit trains its own block (rows independent),
an edit leaves the forward as soon as it is learned, so later steps cost only the edits still learning.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from melo_ray.backbones import Backbone
from melo_ray.config import TrainConfig
from melo_ray.precision import training_dtype
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


def training_formats(backbone: Backbone, formats: list[str] | None) -> list[str]:
    """The formats edits are trained in: as configured, else every format this backbone can be served in
    (raw, and chat where it is a causal LM with a chat template: the server's chat route needs one)."""
    if formats is not None:
        return list(formats)
    chat = backbone.task == "causal_lm" and bool(getattr(backbone.tokenizer, "chat_template", None))
    return ["raw", "chat"] if chat else ["raw"]


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


def _rows_of(value: object, keep: torch.Tensor, batch: int) -> object:
    """`value` (a layer input) restricted to the batch rows `keep`: tensors batch-first, tuples item by item."""
    if isinstance(value, torch.Tensor):
        return value[keep] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_rows_of(v, keep, batch) for v in value)
    return value


class _TargetForward:
    """Logits at the target positions of a causal LM batch, over all rows or a subset of them.

    `rows`, `cols`: each target token's batch row and the position that predicts it; `targets`: its id.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    batch: int

    def _locate(self, labels: torch.Tensor) -> None:
        # Position t predicts the token at t+1: gather hidden states one before each target token.
        self.rows, self.cols = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)
        self.targets = labels[:, 1:][self.rows, self.cols]
        self.batch = labels.shape[0]

    def selection(self, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask over targets of the rows in `keep`, their row numbers within the subset)."""
        if keep is None:
            return torch.ones_like(self.rows, dtype=torch.bool), self.rows
        position = torch.full((self.batch,), -1, dtype=torch.long)
        position[keep] = torch.arange(len(keep))
        mask = position[self.rows] >= 0
        return mask, position[self.rows[mask]]

    def logits(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class _CachedPrefix(_TargetForward):
    """Replays the LoRA-carrying top of a causal LM on cached inputs of its first LoRA block.

    With `low_precision`, a forward under autocast to it uses the backbone's copies of the top's frozen
    weights in that dtype instead of casting every weight again at every step (autocast keeps casts only
    of weights that require grad)."""

    def __init__(self, backbone: Backbone, lora_names: list[str], batch: EditBatch,
                 low_precision: torch.dtype | None = None) -> None:
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
        self._locate(batch.labels)
        self.device_type = backbone.device.type
        self.low_precision = low_precision
        self.copies: dict[nn.Module, dict[str, torch.Tensor]] = {}
        if low_precision is not None:
            for module in [*self.blocks[self.first :], self.norm, self.head]:
                self.copies[module] = backbone.frozen_matrices_in(module, low_precision)

    def _call(self, module: nn.Module, *args: object, **kwargs: object) -> object:
        copies = self.copies.get(module)
        if (copies and torch.is_autocast_enabled(self.device_type)
                and torch.get_autocast_dtype(self.device_type) == self.low_precision):
            return torch.func.functional_call(module, copies, args, kwargs, strict=False)
        return module(*args, **kwargs)

    def logits(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        hidden, rest, kwargs = self.hidden, self.rest, self.kwargs
        if keep is not None:
            hidden = hidden[keep]
            rest = _rows_of(rest, keep, self.batch)
            kwargs = {k: _rows_of(v, keep, self.batch) for k, v in kwargs.items()}
        for block in self.blocks[self.first :]:
            hidden = _first_output(self._call(block, hidden, *rest, **kwargs))
        mask, rows = self.selection(keep)
        return self._call(self.head, self._call(self.norm, hidden[rows, self.cols[mask]]))  # type: ignore[return-value]


class _Segments(_TargetForward):
    """Consecutive runs of rows, each replayed at its own width: a batch of short raw prompts and long
    chat-template prompts would otherwise pad every raw row to the chat width at every step.

    Targets keep the batch's row-major order, so losses, margins and retiring read them as one batch."""

    def __init__(self, parts: list[tuple[int, _TargetForward]], batch: int,
                 active: Callable[[list[int]], AbstractContextManager] | None = None) -> None:
        self.parts = parts  # (first row, the forward over this run's rows)
        self.active = active  # independent rows: the context in which a forward over these rows runs
        self.rows = torch.cat([forward.rows + first for first, forward in parts])
        self.cols = torch.cat([forward.cols for _, forward in parts])
        self.targets = torch.cat([forward.targets for _, forward in parts])
        self.batch = batch

    def logits(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        out = []
        for first, forward in self.parts:
            inside = (torch.arange(forward.batch) if keep is None
                      else keep[(keep >= first) & (keep < first + forward.batch)] - first)  # keep is ascending
            if not len(inside):
                continue
            with self.active((inside + first).tolist()) if self.active is not None else nullcontext():
                out.append(forward.logits(None if keep is None else inside))
        return torch.cat(out)


def _rows_of_batch(batch: EditBatch, start: int, stop: int) -> EditBatch:
    return EditBatch({k: v[start:stop] for k, v in batch.inputs.items()}, batch.labels[start:stop])


class _WholeModel(_TargetForward):
    """The plain forward of a causal LM, full vocabulary at every position (the loss reads the targets)."""

    def __init__(self, backbone: Backbone, batch: EditBatch) -> None:
        self.model, self.inputs = backbone.model, batch.inputs
        self._locate(batch.labels)

    def logits(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        inputs = self.inputs if keep is None else {k: v[keep] for k, v in self.inputs.items()}
        mask, rows = self.selection(keep)
        return self.model(**inputs, use_cache=False).logits[rows, self.cols[mask]]


def _through_last_target(batch: EditBatch) -> EditBatch:
    """A causal LM batch cut after the last position that predicts a target: later positions (the
    longest row's final token) only feed outputs no loss reads, and causal attention never looks ahead."""
    predicting = (batch.labels[:, 1:] != IGNORE).any(0).nonzero()
    if not len(predicting):
        return batch
    width = int(predicting[-1]) + 1
    if width >= batch.labels.shape[1]:
        return batch
    inputs = {k: v[:, :width] if v.dim() == 2 and v.shape[1] == batch.labels.shape[1] else v
              for k, v in batch.inputs.items()}
    return EditBatch(inputs, batch.labels[:, : width + 1])


def _supports_cached_prefix(backbone: Backbone, lora_names: list[str]) -> bool:
    spec = backbone.family
    if backbone.task != "causal_lm" or not (spec.blocks and spec.final_norm and spec.lm_head):
        return False
    return all(n.startswith(spec.blocks + ".") for n in lora_names)


def _other_forward(backbone: Backbone, batch: EditBatch) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Classification and seq2seq backbones: the plain forward; returns (logits at targets, target ids)."""
    model = backbone.model
    labels = batch.labels
    if backbone.task == "classification":
        return (lambda: model(**batch.inputs).logits), labels
    decoder_labels = labels.clone()
    mask = decoder_labels != IGNORE
    rows, cols = torch.nonzero(mask, as_tuple=True)

    def seq2seq_logits() -> torch.Tensor:
        out = model(**batch.inputs, labels=decoder_labels.masked_fill(~mask, backbone.tokenizer.pad_token_id))
        return out.logits[rows, cols]

    return seq2seq_logits, labels[rows, cols]


def _learned_targets(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """Which targets are the argmax by `margin` (bool per target)."""
    with torch.no_grad():
        target_logit = logits.gather(1, targets[:, None]).squeeze(1)
        others = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
        return target_logit - others >= margin


def _learned_fraction(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> float:
    return float(_learned_targets(logits, targets, margin).float().mean())


@dataclass(frozen=True)
class IndependentRows:
    """Batch rows that train disjoint slices of every trained parameter: row r trains slice
    `group_of_row[r]` along dim 0 (MELO with a block per edit: its edit's staging block).
    `active(rows)` is the context in which a forward over those rows, in that order, uses their slices."""

    group_of_row: list[int]
    active: Callable[[list[int]], AbstractContextManager]


def train_block(
    backbone: Backbone,
    batch: EditBatch,
    params: list[nn.Parameter],
    cfg: TrainConfig,
    *,
    trained_modules: list[str],
    active: Callable[[], AbstractContextManager],
    extra_loss: Callable[[], tuple[torch.Tensor, bool]] | None = None,
    independent: IndependentRows | None = None,
    segments: list[int] | None = None,
) -> TrainStats:
    """Optimise `params` for cfg.num_iter steps, or until every target is learned.

    `trained_modules` names the modules that hold `params` (the frozen prefix below the first of them
    is cached); `active` is the context in which the forward uses them (e.g. a staging route).
    `extra_loss` (e.g. ELDER's guided loss) returns a loss to add and whether its goal is met; early
    stopping then waits for both. With `independent` rows (and cfg.retire_learned), a group whose
    targets are all learned leaves the forward and its slices stop moving. `segments`: the batch's rows
    as consecutive runs of these sizes (e.g. one per prompt format), each replayed at its own width.
    """
    started = time.perf_counter()
    names = trained_modules
    fast = cfg.cache_frozen_prefix and _supports_cached_prefix(backbone, names)
    forward: _TargetForward | None = None
    device = backbone.device
    # Causal LMs only: seq2seq and classification backbones keep float32 (a tiny T5 lost an edit in bf16).
    mixed = (training_dtype(cfg.compute_dtype, device, params[0].dtype)
             if params and backbone.task == "causal_lm" else None)
    if fast and segments and len(segments) > 1:
        if sum(segments) != batch.labels.shape[0]:
            raise ValueError(f"segments {segments} do not add up to the batch's {batch.labels.shape[0]} rows")
        starts = [sum(segments[:i]) for i in range(len(segments))]
        forward = _Segments([(start, _CachedPrefix(backbone, names, _through_last_target(
            _rows_of_batch(batch, start, start + size)), mixed)) for start, size in zip(starts, segments) if size],
            batch.labels.shape[0], independent.active if independent is not None else None)
    elif fast:  # the plain forward stays as the reference trainers run it (the naive baselines use it)
        forward = _CachedPrefix(backbone, names, _through_last_target(batch), mixed)
    elif backbone.task == "causal_lm":
        forward = _WholeModel(backbone, batch)
    optimiser = torch.optim.Adam(params, lr=cfg.lr)
    retiring = (forward is not None and independent is not None and extra_loss is None
                and cfg.early_stop and cfg.retire_learned)
    if forward is not None:
        compute_logits, targets = forward.logits, forward.targets
    else:
        compute_logits, targets = _other_forward(backbone, batch)

    if retiring:
        assert forward is not None and independent is not None
        steps, first_loss, final_loss, learned = _train_retiring(
            forward, independent, params, optimiser, cfg, device, mixed)
        every_row: Callable[[], AbstractContextManager] = \
            lambda: independent.active(list(range(len(independent.group_of_row))))
    else:
        every_row = active
        with active():
            steps, first_loss, final_loss, learned = _train_loop(
                compute_logits, targets, optimiser, cfg, extra_loss, cfg.num_iter, device, mixed)
    if mixed is not None:
        # Serving computes in full precision: an edit is done only when it holds there too.
        with every_row():
            final_loss, learned = _measure(compute_logits, targets, cfg, device, None)
            with torch.no_grad():
                goal_met = learned >= 1.0 and (extra_loss is None or extra_loss()[1])
        if cfg.early_stop and not goal_met and steps < cfg.num_iter:
            with active():  # the remaining steps train every row together, in full precision
                more, _, final_loss, learned = _train_loop(
                    compute_logits, targets, optimiser, cfg, extra_loss, cfg.num_iter - steps, device, None)
            steps += more
    return TrainStats(steps, first_loss, final_loss, learned, time.perf_counter() - started, fast)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _measure(compute_logits: Callable[[], torch.Tensor], targets: torch.Tensor, cfg: TrainConfig,
             device: torch.device, dtype: torch.dtype | None) -> tuple[float, float]:
    """(loss, learned fraction) of the current parameters, without a gradient."""
    with torch.no_grad(), _autocast(device, dtype):
        logits = compute_logits().float()
    return float(F.cross_entropy(logits, targets)), _learned_fraction(logits, targets, cfg.early_stop_margin)


def _train_loop(
    compute_logits: Callable[[], torch.Tensor], targets: torch.Tensor, optimiser: torch.optim.Adam,
    cfg: TrainConfig, extra_loss: Callable[[], tuple[torch.Tensor, bool]] | None, budget: int,
    device: torch.device, dtype: torch.dtype | None,
) -> tuple[int, float, float, float]:
    """At most `budget` steps over every row, the forward under autocast to `dtype` when given.
    Returns (steps, first loss, final loss, learned fraction)."""
    first_loss = final_loss = float("nan")
    learned = 0.0
    steps = 0
    for step in range(budget):
        with _autocast(device, dtype):
            logits = compute_logits().float()
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
        final_loss, learned = _measure(compute_logits, targets, cfg, device, dtype)
    return steps, first_loss, final_loss, learned


def _train_retiring(
    forward: _TargetForward, independent: IndependentRows, params: list[nn.Parameter],
    optimiser: torch.optim.Adam, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
) -> tuple[int, float, float, float]:
    """The training loop for independent groups: a learned group's rows leave the forward.

    The loss is summed over the live targets and divided by the batch's target count, so a live
    group's gradient is what it would be with every row present. A retired group's Adam momentum is
    zeroed: its slices get zero gradient from then on, so Adam leaves them exactly where they were
    learned, and its loss and margins stay as measured when it retired.
    Returns (steps, first loss, final loss, learned fraction) over all targets.
    """
    group_of_row = torch.tensor(independent.group_of_row)
    group_of_target = group_of_row[forward.rows]
    total = len(forward.targets)
    live = torch.arange(forward.batch)
    retired_loss = 0.0  # summed loss of retired groups' targets, frozen with them
    retired_targets = 0
    first_loss = float("nan")
    steps = 0
    live_loss, live_learned = 0.0, torch.zeros(0, dtype=torch.bool)
    retire_margin = cfg.early_stop_margin if cfg.retire_margin is None else max(cfg.retire_margin, cfg.early_stop_margin)
    for step in range(cfg.num_iter + 1):
        with independent.active(live.tolist()), _autocast(device, dtype):
            logits = forward.logits(live).float()
        mask, _ = forward.selection(live)
        targets, groups = forward.targets[mask], group_of_target[mask]
        per_target = F.cross_entropy(logits, targets, reduction="none")
        live_loss = float(per_target.detach().sum())
        if step == 0:
            first_loss = live_loss / total
        live_learned = _learned_targets(logits, targets, cfg.early_stop_margin).cpu()
        if step == cfg.num_iter:  # the last look, after the last step
            break
        firm = _learned_targets(logits, targets, retire_margin).cpu()
        present = groups.unique()
        done = present[~torch.isin(present, groups[~firm])]
        finishing = torch.isin(groups, done)
        if bool(finishing.all()):
            break
        if len(done):
            retired_loss += float(per_target.detach()[finishing.to(per_target.device)].sum())
            retired_targets += int(finishing.sum())
            _freeze_slices(optimiser, params, done)
        loss = per_target[~finishing.to(per_target.device)].sum() / total
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        steps += 1
        live = live[~torch.isin(group_of_row[live], done)]
    learned = (retired_targets + int(live_learned.sum())) / total
    return steps, first_loss, (retired_loss + live_loss) / total, learned


def _freeze_slices(optimiser: torch.optim.Adam, params: list[nn.Parameter], groups: torch.Tensor) -> None:
    """Zero Adam's momentum of these groups' slices: with zero gradients they then never move."""
    for param in params:
        state = optimiser.state.get(param)
        if state and "exp_avg" in state:
            state["exp_avg"][groups] = 0
