from __future__ import annotations

import pytest

from conftest import CONFIGS
from melo_ray.config import ConfigError, load_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.section("lora").target_modules


def test_unknown_and_missing_fields_are_named():
    with pytest.raises(ConfigError, match=r"field 'index.r_inti'"):
        load_config({"lora": {"target_modules": ["x"]}, "index": {"key_module": "y", "r_inti": 1.0}})
    with pytest.raises(ConfigError, match=r"field 'lora.target_modules': Field required"):
        load_config({"index": {"key_module": "y"}})  # MELO's own section, required for a MELO config
    with pytest.raises(ConfigError, match="needs `key_module`"):
        load_config({"lora": {"target_modules": ["x"]}, "index": {"key_function": "mean"}})


def test_unreadable_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("lora: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


def test_overrides_are_typed_and_validated():
    from melo_ray.config import with_overrides

    base = load_config(CONFIGS / "smollm2-135m.yaml")
    changed = with_overrides(base, ["elder.replay=50", "elder.guide_stored=true", "train.lr=0.003"])
    elder = changed.section("elder")
    assert (elder.replay, elder.guide_stored, changed.train.lr) == (50, True, 0.003)
    assert base.section("elder").replay != 50 and with_overrides(base, []) is base  # the original is untouched
    with pytest.raises(ConfigError, match=r"field 'elder.replay'"):
        with_overrides(base, ["elder.replay=-1"])
    with pytest.raises(ConfigError, match=r"field 'elder.replya'"):
        with_overrides(base, ["elder.replya=3"])
    with pytest.raises(ConfigError, match="expected section.field=value"):
        with_overrides(base, ["elder.replay"])
    with pytest.raises(ConfigError, match="'editor' is not a section"):
        with_overrides(base, ["editor.x=1"])


def test_an_editor_needs_only_its_own_sections():
    """A GRACE config holds no MELO sections; a config asks the registry which sections an editor reads."""
    backbone = {"source": "tiny", "family": "llama", "tiny": {"hidden_size": 8}}
    grace = load_config({"editor": "grace", "backbone": backbone, "grace": {"layer": "model.layers.0"}})
    assert sorted(grace.sections) == ["grace"] and grace.section("grace").layer == "model.layers.0"
    assert "lora" not in grace.model_dump() and grace.section("elder").num_experts == 4  # defaults on demand
    with pytest.raises(ConfigError, match=r"no 'lora' section.*field 'lora.target_modules'"):
        grace.section("lora")
    with pytest.raises(ConfigError, match=r"field 'grace.eps_init'"):  # another editor's section is still checked
        load_config({"editor": "lora", "backbone": backbone, "lora": {"target_modules": ["x"]},
                     "grace": {"eps_init": -1}})
    with pytest.raises(KeyError, match="no registered editor"):
        grace.section("nope")


def test_a_config_is_written_as_its_yaml_reads_and_old_files_are_translated_on_load():
    config = load_config(CONFIGS / "tiny-llama.yaml")
    written = config.model_dump(mode="json")
    assert {"lora", "index", "grace"} <= set(written) and "sections" not in written  # top level, like the file
    assert load_config(written) == config
    # a manifest as earlier versions wrote it: editors' sections nested, train_rephrases under lora
    old = {k: v for k, v in written.items() if k != "train"}
    old = {**old, "lora": {**old["lora"], "train_rephrases": False}, "sections": {"elder": {"replay": 7}}}
    upgraded = load_config(old)
    assert upgraded.train.train_rephrases is False and upgraded.section("elder").replay == 7
    assert "train_rephrases" not in upgraded.model_dump(mode="json")["lora"]
    with pytest.raises(ConfigError, match="lora.train_rephrases is now train.train_rephrases"):
        load_config({**written, "lora": {**written["lora"], "train_rephrases": False}})  # both, disagreeing
    with pytest.raises(ConfigError, match="sections: must be a mapping"):
        load_config({**written, "sections": ["elder"]})
