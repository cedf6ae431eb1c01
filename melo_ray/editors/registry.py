"""The editor registry: name -> editor class and what it supports.

The eval harness, the bulk-edit job, the server and the CLI look editors up here, so adding an
editor is its package plus one line in `EDITORS`. Classes are imported on first use, by name: the
config module validates `editor:` and collects each editor's own config sections from these specs
without importing torch-heavy code, and no config module imports another editor's.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from melo_ray.snapshots import SnapshotError

if TYPE_CHECKING:
    from melo_ray.backbones import Backbone
    from melo_ray.config import EditorConfig
    from melo_ray.editors.protocol import Editor


@dataclass(frozen=True)
class ConfigSection:
    """A top-level config section: its YAML key and its pydantic model ("module:Class")."""

    name: str
    config: str

    def load_class(self) -> Any:
        return _load(self.config)


@dataclass(frozen=True)
class EditorSpec:
    """One registered editor. `shared_state`: every batch edits state earlier batches trained (so a
    job cannot train batches in parallel); otherwise each batch trains a state of its own.
    `sections`: the config sections it reads; a config for this editor always holds them (their
    defaults where the file has none), while a config for another editor may leave them out."""

    name: str
    target: str  # "module:Class"
    summary: str
    shared_state: bool
    sections: tuple[ConfigSection, ...] = ()

    def load_class(self) -> type["Editor"]:
        return _load(self.target)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


LORA = ConfigSection("lora", "melo_ray.editors.melo.config:LoraConfig")
INDEX = ConfigSection("index", "melo_ray.editors.melo.config:IndexConfig")
ELDER = ConfigSection("elder", "melo_ray.editors.elder.config:ElderConfig")
GRACE = ConfigSection("grace", "melo_ray.editors.grace.config:GraceConfig")

EDITORS: dict[str, EditorSpec] = {spec.name: spec for spec in (
    EditorSpec("melo", "melo_ray.editors.melo.editor:MeloEditor", "neuron-indexed dynamic LoRA (ours)", False,
               (LORA, INDEX)),
    # ELDER's experts sit on elder.target_modules, or on lora.target_modules when it names none
    EditorSpec("elder", "melo_ray.editors.elder.editor:ElderEditor", "mixture of LoRA experts, learned router", True,
               (ELDER, INDEX)),
    EditorSpec("grace", "melo_ray.editors.grace.editor:GraceEditor", "codebook at one layer (baseline)", True, (GRACE,)),
    EditorSpec("lora", "melo_ray.editors.lora.editor:SequentialLoraEditor", "sequential LoRA fine-tuning (baseline)",
               True, (LORA,)),
    EditorSpec("alphaedit", "melo_ray.editors.alphaedit.editor:AlphaEditEditor", "null-space locate-then-edit (peer)",
               True, (ConfigSection("alphaedit", "melo_ray.editors.alphaedit.config:AlphaEditConfig"),)),
    EditorSpec("wise", "melo_ray.editors.wise.editor:WiseEditor", "side memory with an activation router (peer)", True,
               (ConfigSection("wise", "melo_ray.editors.wise.config:WiseConfig"),)),
    EditorSpec("memoir", "melo_ray.editors.memoir.editor:MemoirEditor", "sparse residual memory, mask-overlap routing "
               "(peer)", True, (ConfigSection("memoir", "melo_ray.editors.memoir.config:MemoirConfig"),)),
    EditorSpec("ultraedit", "melo_ray.editors.ultraedit.editor:UltraEditEditor", "closed-form lifelong-normalised edit "
               "(peer)", True, (ConfigSection("ultraedit", "melo_ray.editors.ultraedit.config:UltraEditConfig"),)),
)}


def config_sections() -> dict[str, ConfigSection]:
    """Every registered editor's config sections by name (editors may share one, e.g. `lora`)."""
    found: dict[str, ConfigSection] = {}
    for spec in EDITORS.values():
        for section in spec.sections:
            if found.setdefault(section.name, section) != section:
                raise ValueError(f"config section '{section.name}' is registered with two classes: "
                                 f"{found[section.name].config} and {section.config}")
    return found


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
    name = manifest.get("editor")
    if not isinstance(name, str) or name not in EDITORS:
        raise SnapshotError(f"{where}: snapshot of unknown editor '{name}'; this build knows {', '.join(EDITORS)}")
    return editor_class(name).from_files(manifest, files, where, backbone)
