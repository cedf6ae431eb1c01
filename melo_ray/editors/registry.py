"""The editor registry: name -> editor class and what it supports.

The eval harness, the bulk-edit job, the server and the CLI look editors up here, so adding an
editor is its package plus one line in `EDITORS`. Classes are imported on first use: the config
module validates `editor:` against these names without importing torch-heavy code.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from melo_ray.backbones import Backbone
    from melo_ray.config import EditorConfig
    from melo_ray.editors.protocol import Editor


@dataclass(frozen=True)
class EditorSpec:
    """One registered editor. `shared_state`: every batch edits state earlier batches trained (so a
    job cannot train batches in parallel); otherwise each batch trains a state of its own."""

    name: str
    target: str  # "module:Class"
    summary: str
    shared_state: bool
    section: str | None = None  # a config section of its own (top-level YAML key), if any
    config: str | None = None  # "module:Class" of that section (a pydantic model)

    def load_class(self) -> type["Editor"]:
        return _load(self.target)

    def load_config_class(self) -> Any:
        if self.config is None:
            raise ValueError(f"editor '{self.name}' declares no config class")
        return _load(self.config)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


EDITORS: dict[str, EditorSpec] = {spec.name: spec for spec in (
    EditorSpec("melo", "melo_ray.editors.melo.editor:MeloEditor", "neuron-indexed dynamic LoRA (ours)", False),
    EditorSpec("elder", "melo_ray.editors.elder.editor:ElderEditor", "mixture of LoRA experts, learned router", True),
    EditorSpec("grace", "melo_ray.editors.grace.editor:GraceEditor", "codebook at one layer (baseline)", True),
    EditorSpec("lora", "melo_ray.editors.lora.editor:SequentialLoraEditor", "sequential LoRA fine-tuning (baseline)", True),
    EditorSpec("alphaedit", "melo_ray.editors.alphaedit.editor:AlphaEditEditor", "null-space locate-then-edit (peer)", True, "alphaedit", "melo_ray.editors.alphaedit.config:AlphaEditConfig"),
    EditorSpec("wise", "melo_ray.editors.wise.editor:WiseEditor", "side memory with an activation router (peer)", True, "wise", "melo_ray.editors.wise.config:WiseConfig"),
    EditorSpec("memoir", "melo_ray.editors.memoir.editor:MemoirEditor", "sparse residual memory, mask-overlap routing (peer)", True, "memoir", "melo_ray.editors.memoir.config:MemoirConfig"),
    EditorSpec("ultraedit", "melo_ray.editors.ultraedit.editor:UltraEditEditor", "closed-form lifelong-normalised edit (peer)", True, "ultraedit", "melo_ray.editors.ultraedit.config:UltraEditConfig"),
)}


def editor_names() -> tuple[str, ...]:
    return tuple(EDITORS)


def editor_specs() -> tuple[EditorSpec, ...]:
    return tuple(EDITORS.values())


def editor_spec(name: str) -> EditorSpec:
    try:
        return EDITORS[name]
    except KeyError:
        raise ValueError(f"unknown editor '{name}'; choose from {', '.join(EDITORS)}") from None


def editor_class(name: str) -> type["Editor"]:
    return editor_spec(name).load_class()


def build_editor(name: str, config: "EditorConfig", backbone: "Backbone | None" = None,
                 device: str | None = None) -> "Editor":
    """A fresh editor of the named kind on `backbone` (loaded from the config when None)."""
    return editor_class(name)(config, backbone, device)


def editor_from_snapshot(manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str,
                         backbone: "Backbone | None" = None) -> "Editor":
    """The editor a verified snapshot was written by, restored from it."""
    from melo_ray.snapshots import SnapshotError

    name = manifest.get("editor")
    if not isinstance(name, str) or name not in EDITORS:
        raise SnapshotError(f"{where}: snapshot of unknown editor '{name}'; this build knows {', '.join(EDITORS)}")
    return editor_class(name).from_files(manifest, files, where, backbone)


def load_editor(source: str | Path, backbone: "Backbone | None" = None) -> "Editor":
    """The editor a snapshot folder (or store root, local or URI) was written by."""
    from melo_ray.store import read_any_snapshot

    manifest, files, where = read_any_snapshot(source)
    return editor_from_snapshot(manifest, files, where, backbone)
