"""Editors from snapshots on disk or in a store: read (verified), then built or restored.

Apart from the protocol, so that an editor knows only snapshot files and the store stays above it."""
from __future__ import annotations

from pathlib import Path

from melo_ray.backbones import Backbone
from melo_ray.editors.protocol import Editor
from melo_ray.editors.registry import editor_from_snapshot
from melo_ray.store import read_any_snapshot


def load_editor(source: str | Path, backbone: Backbone | None = None) -> Editor:
    """The editor a snapshot folder (or store root: its latest version; local or URI) was written by.

    The backbone (loaded from the snapshot's config when None) must hash to the snapshot's base checksum."""
    manifest, files, where = read_any_snapshot(source)
    return editor_from_snapshot(manifest, files, where, backbone)


def restore_editor(editor: Editor, source: str | Path) -> None:
    """Replace `editor`'s state with a snapshot folder's or a store's latest (same editor, same backbone)."""
    manifest, files, where = read_any_snapshot(source)
    editor.restore_files(manifest, files, where)
