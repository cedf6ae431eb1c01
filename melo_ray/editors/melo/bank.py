"""MELO's LoRA bank as data: growing without re-copying, and its snapshot files in segments.

A bank of B blocks per target layer is two tensors, A (B, p, in) and B (B, out, p). Appending with
`torch.cat` copies the whole bank on every commit, which makes a long job quadratic; `GrowingRows`
doubles a spare buffer instead. On disk the bank is cut into segments of `SEGMENT_BLOCKS` blocks
(`adapters-00000.safetensors`, ...): a new block only changes the last segment, so a store that
reuses unchanged files (SnapshotStore.publish) writes O(segment) bytes per version, not O(bank).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import safetensors.torch
import torch

from melo_ray.snapshots import SnapshotError

SEGMENT_BLOCKS = 64
LEGACY_FILE = "adapters.safetensors"  # snapshots written before segments: the whole bank in one file
_SEGMENT = re.compile(r"^adapters-(\d{5})\.safetensors$")


def check_bank_shape(a: torch.Tensor, b: torch.Tensor, like_a: torch.Tensor, like_b: torch.Tensor, what: str, *,
                     blocks: int | None = None, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming `what` unless blocks A (n, rank, in) and B (n, out, rank) fit a bank shaped
    like (like_a, like_b): both 3-d, the same n (`blocks`, when given), the bank's rank, in and out."""
    fits = (a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0] and (blocks is None or a.shape[0] == blocks)
            and tuple(a.shape[1:]) == tuple(like_a.shape[1:]) and tuple(b.shape[1:]) == tuple(like_b.shape[1:]))
    if not fits:
        wanted = f"{blocks} block(s) of " if blocks is not None else ""
        raise error(f"{what} has the wrong shape: {tuple(a.shape)}/{tuple(b.shape)}, not {wanted}"
                    f"(n, {', '.join(map(str, like_a.shape[1:]))})/(n, {', '.join(map(str, like_b.shape[1:]))})")


class GrowingRows:
    """Appends rows along dim 0 in amortised O(rows appended): the live tensor is a prefix view of a
    spare buffer that doubles when full. Views handed out earlier stay valid (appends write past them)."""

    def __init__(self) -> None:
        self._spare: torch.Tensor | None = None
        self._length = 0  # rows of the spare handed out so far

    def append(self, current: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`current` + `rows`; `current` is the tensor this returned last time, or any other start
        (moved to another device, loaded from a snapshot): then the spare is rebuilt from it."""
        n, extra = current.shape[0], rows.shape[0]
        spare = self._spare
        # rebuild unless `current` is exactly what this returned last (a shorter view of the spare, e.g.
        # a bank reset to [:0], must not write over rows an earlier view still shows)
        if (spare is None or spare.shape[0] < n + extra or spare.data_ptr() != current.data_ptr()
                or n != self._length or spare.device != current.device or spare.dtype != current.dtype
                or spare.shape[1:] != current.shape[1:]):
            spare = torch.empty((max(16, 2 * (n + extra)), *current.shape[1:]), dtype=current.dtype,
                                device=current.device)
            spare[:n] = current
            self._spare = spare
        spare[n : n + extra] = rows.to(spare)
        self._length = n + extra
        return spare[: n + extra]


def bank_files(banks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               full_segments: list[bytes] | None = None) -> dict[str, bytes]:
    """Snapshot files of a bank: per segment, every layer's A and B rows of those blocks.

    `full_segments`, when given, caches the bytes of segments that are full: a bank that only grows
    (the job's writer) never changes them again, so each is serialised once, not at every publish."""
    sizes = {a.shape[0] for a, _ in banks.values()}
    if len(sizes) > 1:
        raise ValueError(f"LoRA layers disagree on the number of blocks: {sizes}")
    total = sizes.pop() if sizes else 0
    if full_segments is not None and len(full_segments) > total // SEGMENT_BLOCKS:
        raise ValueError("bank_files: the cached segments outnumber the bank's full ones (the bank shrank)")
    files = {}
    for segment, start in enumerate(range(0, max(total, 1), SEGMENT_BLOCKS)):
        full = start + SEGMENT_BLOCKS <= total
        if full and full_segments is not None and segment < len(full_segments):
            data = full_segments[segment]
        else:
            data = _segment_bytes(banks, start)
            if full and full_segments is not None and segment == len(full_segments):
                full_segments.append(data)
        files[f"adapters-{segment:05d}.safetensors"] = data
    return files


def _segment_bytes(banks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], start: int) -> bytes:
    tensors = {}
    for name, (a, b) in banks.items():
        tensors[f"{name}.lora_bank_A"] = a[start : start + SEGMENT_BLOCKS].detach().cpu().contiguous()
        tensors[f"{name}.lora_bank_B"] = b[start : start + SEGMENT_BLOCKS].detach().cpu().contiguous()
    return safetensors.torch.save(tensors, metadata={"first_block": str(start)})


def read_bank(files: Mapping[str, bytes], names: list[str], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The bank of each named layer from a snapshot's segment files (or the single legacy file)."""
    segments = sorted((int(m.group(1)), name) for name in files if (m := _SEGMENT.match(name)))
    if not segments and LEGACY_FILE in files:
        segments = [(0, LEGACY_FILE)]
    if not segments:
        raise SnapshotError(f"{where}: no adapters files")
    if [n for n, _ in segments] != list(range(len(segments))):
        raise SnapshotError(f"{where}: adapters segments are not numbered 0..{len(segments) - 1}")
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {n: ([], []) for n in names}
    for number, file in segments:
        try:
            tensors = safetensors.torch.load(files[file])
        except (ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: {file} is unreadable ({exc})") from exc
        for name in names:
            try:
                a, b = tensors[f"{name}.lora_bank_A"], tensors[f"{name}.lora_bank_B"]
            except KeyError as exc:
                raise SnapshotError(f"{where}: {file} has no bank for '{name}'") from exc
            if a.shape[0] != b.shape[0] or (number < len(segments) - 1 and a.shape[0] != SEGMENT_BLOCKS
                                             and file != LEGACY_FILE):
                raise SnapshotError(f"{where}: {file} holds a bank of the wrong length for '{name}'")
            parts[name][0].append(a)
            parts[name][1].append(b)
    return {name: (torch.cat(a_parts), torch.cat(b_parts)) for name, (a_parts, b_parts) in parts.items()}
