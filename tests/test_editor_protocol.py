"""The editor protocol and registry: every editor runs in the CLI, the serving engine and (in
test_pipeline.py) the bulk-edit job; a new editor is its own module plus one registry line."""
from __future__ import annotations

import json
import pickle

import numpy as np
import torch
import pytest
from pydantic import Field

from conftest import CONFIGS, fact_records, tiny_config
from melo_ray.backbones import load_backbone
from melo_ray.config import ConfigError, load_config
from melo_ray.config_base import StrictConfig
from melo_ray.editors import registry
from melo_ray.editors.layers import EditLayer, remove_edit_layers, weights_checksum
from melo_ray.editors.loading import load_editor, restore_editor
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.editors.messages import StaleStateError
from melo_ray.editors.registry import INDEX, LORA, ConfigSection, EditorSpec, build_editor, editor_names
from melo_ray.editors.routing import Routing
from melo_ray.editors.single_writer import WriterLayout
from melo_ray.records import RecordError, parse_record
from melo_ray.serving.app import ApiError, ServeSettings, describe_serving, start_engine
from melo_ray.serving.engine import CompletionRequest, ServingEngine
from melo_ray.snapshots import SnapshotError
from melo_ray.store import SnapshotFolder, SnapshotStore, open_snapshots, read_any_snapshot

TINY = str(CONFIGS / "tiny-llama.yaml")
EDITOR_SETTINGS = {"grace": {"grace": {"num_iter": 30}}, "elder": {"elder": {"num_experts": 8, "num_iter": 20}}}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", editor_names())
def test_every_editor_goes_edit_snapshot_serve(name, tmp_path, capsys):
    """CLI edit -> verified snapshot folder -> CLI generate and the serving engine, for each editor."""
    from melo_ray.cli.main import main

    records = fact_records(0, 6)
    edits = _jsonl(tmp_path / "edits.jsonl", records)
    overrides = [f"{section}.{k}={v}" for section, values in EDITOR_SETTINGS.get(name, {}).items()
                 for k, v in values.items()]
    args = ["edit", "--config", TINY, "--editor", name, "--edits", str(edits), "--out", str(tmp_path / "snap"),
            "--batch-size", "3", "--quiet"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    assert f"editor={name} edits=6" in capsys.readouterr().out

    prompts = [r["prompt"] for r in records]
    _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    assert main(["generate", "--snapshot", str(tmp_path / "snap"), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--json", "--max-new-tokens", "6"]) == 0
    generated = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["snapshot_version"] for g in generated] == [2] * 6

    editor = load_editor(tmp_path / "snap")
    assert editor.name == name and editor.version == 2 and editor.stats()["edits"] == 6
    manifest, files, _ = read_any_snapshot(tmp_path / "snap")
    engine = ServingEngine.from_snapshot(manifest, files)
    served = engine.complete([CompletionRequest(p, 6) for p in prompts])
    assert all(c.version == 2 for c in served)
    # the server answers exactly as the CLI and the restored editor do
    assert [c.text.strip() for c in served] == [g["output"] for g in generated]
    assert [c.text.strip() for c in served] == [g.output for g in editor.generate(prompts, 6)]
    if name in ("melo", "grace"):  # routed editors: each edited prompt reaches its own edit
        assert all(c.block is not None for c in served)
    if name == "melo":  # and MELO's blocks carry the targets on this tiny model
        assert sum(c.text.strip().startswith(r["target"]) for c, r in zip(served, records)) >= 5


def test_an_elder_server_with_an_empty_store_serves_the_base_model():
    """Bug: every request failed with "routed() needs the keys of the route() call it follows"."""
    config = tiny_config(elder={"num_experts": 4}).model_copy(update={"editor": "elder"})
    engine = ServingEngine(config)
    out = engine.complete([CompletionRequest("Where does the apple live?", 5), CompletionRequest("zzzz", 3)])
    base = engine.editor.generate(["Where does the apple live?", "zzzz"], 5, base=True)
    assert out[0].text.strip() == base[0].output and out[0].version is None and out[0].block is None
    # and a routing object carries the ELDER keys, so no hidden order between route() and routed()
    editor = engine.editor
    routing = editor.routing(["a", "b"], base=True)
    assert routing.keys is None and (routing.ids == -1).all()


def test_records_without_ids_never_share_an_elder_allocation():
    """Bug: a record without an id got its row number, so a second job's row 0 reused the first's fact."""
    first = parse_record({"prompt": "Where does the apple live?", "target": "Oslo"}, "a.jsonl", 0)
    second = parse_record({"prompt": "Where does the river live?", "target": "Lima"}, "b.jsonl", 0)
    again = parse_record({"prompt": "Where does the apple live?", "target": "Oslo"}, "c.jsonl", 7)
    assert first.id != second.id and first.id == again.id  # derived from the content, not the row

    config = tiny_config(elder={"num_experts": 8, "num_iter": 5}).model_copy(update={"editor": "elder"})
    editor = build_editor("elder", config)
    editor.edit([{"prompt": r["prompt"], "target": r["target"]} for r in fact_records(0, 3)])
    editor.edit([{"prompt": r["prompt"], "target": r["target"]} for r in fact_records(3, 3)])
    assert len(editor.allocations) == 6  # six facts, six allocations (was 3: rows 0-2 merged)


def test_the_server_serves_a_snapshot_folder_written_by_edit(tmp_path):
    """Bug: `melo-ray serve --snapshots FOLDER` served the base model with version null and 0 edits."""
    editor = MeloEditor(tiny_config())
    records = fact_records(0, 5)
    editor.edit(records)
    editor.save(tmp_path / "snap")
    assert isinstance(open_snapshots(tmp_path / "snap"), SnapshotFolder)
    assert isinstance(open_snapshots(tmp_path / "empty-store"), SnapshotStore)

    start = start_engine(ServeSettings(snapshots=str(tmp_path / "snap"), config=TINY))
    source, engine = start.source, start.engine
    assert isinstance(source, SnapshotFolder) and source.latest_version() == 1
    assert engine.version == 1 and engine.stats["edits"] == 5
    assert describe_serving(ServeSettings(snapshots="x"), engine.version) == "snapshot v1"
    out = engine.complete([CompletionRequest(records[0]["prompt"], 6)])
    assert out[0].block == 0 and out[0].text.strip().startswith(records[0]["target"])

    # `melo-ray edit` rewrites the folder after each batch: the replica's poll sees the new version
    editor.edit(fact_records(5, 5))
    editor.save(tmp_path / "snap")
    assert source.latest_version() == 2 and source.read(2)[0]["stats"]["edits"] == 10

    # an empty store with a config serves the base model and says so; without a config it refuses
    settings = ServeSettings(snapshots=str(tmp_path / "nothing"), config=TINY)
    base = start_engine(settings).engine
    assert base.version is None and describe_serving(settings, base.version).startswith("base model")
    with pytest.raises(SnapshotError, match="no snapshot yet"):
        start_engine(ServeSettings(snapshots=str(tmp_path / "nothing")))


@pytest.mark.parametrize("error", [
    RecordError("edits.parquet", 3, "target", "is empty"),
    RecordError("edits.parquet", None, None, "no such file"),
    ApiError(422, "field 'prompts': bad", "prompts"),
    SnapshotError("v3: checksum mismatch"), ConfigError("x.yaml: field 'a': bad"), StaleStateError("v1 vs v2"),
])
def test_our_exceptions_survive_pickling(error):
    """Bug: a RecordError raised in an actor reached the driver as an UnserializableException."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_a_writer_layout_is_typed_and_crosses_processes():
    """The trainer hands the writer actor a typed layout (shapes by layer, key size), not a dict."""
    editor = MeloEditor(tiny_config())
    layout = editor.writer_layout()
    assert isinstance(layout, WriterLayout) and layout.key_dim == editor.key_dim()
    assert {name: (s.in_features, s.out_features) for name, s in layout.layers.items()} == {
        name: (layer.in_features, layer.out_features) for name, layer in editor.layers.items()}
    assert pickle.loads(pickle.dumps(layout)) == layout
    assert build_editor("grace", tiny_config()).writer_layout() is None  # no writer, no layout


def test_edit_layers_are_found_by_type_and_leave_the_base_checksum_alone():
    backbone = load_backbone(tiny_config().backbone)
    base = weights_checksum(backbone.model)
    for name in editor_names():
        config = tiny_config(**EDITOR_SETTINGS.get(name, {})).model_copy(update={"editor": name})
        editor = build_editor(name, config, backbone)
        editor.edit(fact_records(0, 2))
        assert weights_checksum(backbone.model) == base, name  # the editor's own state is not hashed
        if name != "lora":  # PEFT's layers are PEFT's to remove
            assert any(isinstance(m, EditLayer) for m in backbone.model.modules())
            remove_edit_layers(backbone.model)
            assert not any(isinstance(m, EditLayer) for m in backbone.model.modules())
            assert weights_checksum(backbone.model) == base
        else:
            backbone = load_backbone(tiny_config().backbone)


# -- a fifth editor: its own module (here, this test module) plus one registry entry ---------------
class EchoConfig(StrictConfig):
    """The toy editor's own config section."""

    block_seed_offset: int = Field(0, ge=0, description="Added to train.seed for each block.")


class EchoEditor(MeloEditor):
    """A user's editor: MELO's machinery under another name, with a config section of its own."""

    name = "echo"

    def train_batch(self, records):
        assert self.config.section("echo").block_seed_offset == 7  # its section reached it, typed
        return super().train_batch(records)


def test_a_fifth_editor_is_its_module_plus_one_registry_line(tmp_path, monkeypatch, capsys):
    from melo_ray.cli.main import main

    spec = EditorSpec("echo", f"{__name__}:EchoEditor", "a user's editor", False,
                      (LORA, INDEX, ConfigSection("echo", f"{__name__}:EchoConfig")))
    monkeypatch.setitem(registry.EDITORS, "echo", spec)  # the one registry line
    config_file = tmp_path / "echo.yaml"
    data = load_config(TINY).model_dump(mode="json") | {"editor": "echo", "echo": {"block_seed_offset": 7}}
    config_file.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(ConfigError, match="block_seed_offset"):
        load_config(data | {"echo": {"block_seed_offset": -1}})

    records = fact_records(0, 4)
    edits = _jsonl(tmp_path / "edits.jsonl", records)
    assert main(["edit", "--config", str(config_file), "--edits", str(edits), "--out", str(tmp_path / "snap"),
                 "--quiet"]) == 0
    assert "editor=echo edits=4" in capsys.readouterr().out
    manifest, files, _ = read_any_snapshot(tmp_path / "snap")
    assert manifest["editor"] == "echo" and manifest["config"]["echo"] == {"block_seed_offset": 7}
    engine = ServingEngine.from_snapshot(manifest, files)
    out = engine.complete([CompletionRequest(r["prompt"], 6) for r in records])
    assert sum(o.text.strip().startswith(r["target"]) for o, r in zip(out, records)) >= 3
    assert isinstance(engine.editor, EchoEditor)


def test_routing_is_a_value_not_hidden_state():
    editor = MeloEditor(tiny_config())
    editor.edit(fact_records(0, 5))
    prompts = [r["prompt"] for r in fact_records(0, 5)]
    first = editor.route(prompts)
    editor.route(["zzzz qqqq"])  # a route call in between changes nothing for `first`
    with editor.routed(first):
        from melo_ray.inference import next_token_logits

        logits = next_token_logits(editor.backbone, prompts)
    np.testing.assert_allclose(logits.numpy(), editor.next_token_logits(prompts).numpy(), rtol=1e-5, atol=1e-6)
    assert isinstance(first, Routing) and (first.ids >= 0).all()


def test_a_backbone_loads_in_its_configured_dtype_and_snapshots_stay_with_it(tmp_path):
    config = tiny_config(backbone={"dtype": "bfloat16"})
    editor = MeloEditor(config)
    assert next(editor.backbone.model.parameters()).dtype == torch.bfloat16
    records = fact_records(0, 5)
    editor.edit(records)
    assert all(layer.lora_bank_A.dtype == torch.bfloat16 for layer in editor.layers.values())
    outputs = [g.output for g in editor.generate([r["prompt"] for r in records], 6)]
    assert sum(o.startswith(r["target"]) for o, r in zip(outputs, records)) >= 4
    editor.save(tmp_path / "bf16")
    with pytest.raises(SnapshotError, match="other base weights"):
        restore_editor(MeloEditor(tiny_config()), tmp_path / "bf16")  # fp32 base: another checksum
