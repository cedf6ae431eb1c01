"""Editors behind one interface: MELO (ours), ELDER, and the baselines they are compared with."""
from __future__ import annotations

from melo_ray.backbones import Backbone
from melo_ray.config import EditorConfig

EDITOR_NAMES = ("melo", "elder", "grace", "lora")
SNAPSHOT_EDITORS = ("melo", "elder")  # those whose state is a snapshot: edit, generate, the job, the server


def build_editor(name: str, config: EditorConfig, backbone: Backbone | None = None):
    """A fresh editor of the named kind on `backbone` (loaded from the config when None)."""
    if name == "melo":
        from melo_ray.editors.melo import MeloEditor

        return MeloEditor(config, backbone)
    if name == "elder":
        from melo_ray.editors.elder import ElderEditor

        return ElderEditor(config, backbone)
    if name == "grace":
        from melo_ray.editors.grace import GraceEditor

        return GraceEditor(config, backbone)
    if name == "lora":
        from melo_ray.editors.lora_ft import SequentialLoraEditor

        return SequentialLoraEditor(config, backbone)
    raise ValueError(f"unknown editor '{name}'; choose from {', '.join(EDITOR_NAMES)}")


def load_editor(source, backbone: Backbone | None = None):
    """The MELO or ELDER editor a snapshot folder (or store root, local or URI) was written by."""
    from melo_ray.editors.elder import ElderEditor
    from melo_ray.editors.melo import MeloEditor
    from melo_ray.snapshots import SnapshotError
    from melo_ray.store import read_any_snapshot

    manifest, files, where = read_any_snapshot(source)
    kind = {"melo": MeloEditor, "elder": ElderEditor}.get(manifest.get("editor"))
    if kind is None:
        raise SnapshotError(f"{where}: snapshots of editor '{manifest.get('editor')}' cannot be loaded; "
                            f"only {', '.join(SNAPSHOT_EDITORS)}")
    return kind.from_files(manifest, files, where, backbone)
