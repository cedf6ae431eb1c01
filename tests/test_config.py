from __future__ import annotations

import pytest

from conftest import CONFIGS
from melo_ray.config import ConfigError, load_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.lora.target_modules


def test_unknown_and_missing_fields_are_named():
    with pytest.raises(ConfigError, match=r"field 'index.r_inti'"):
        load_config({"lora": {"target_modules": ["x"]}, "index": {"key_module": "y", "r_inti": 1.0}})
    with pytest.raises(ConfigError, match=r"field 'lora'"):
        load_config({"index": {"key_module": "y"}})
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
    assert (changed.elder.replay, changed.elder.guide_stored, changed.train.lr) == (50, True, 0.003)
    assert base.elder.replay != 50 and with_overrides(base, []) is base  # the original is untouched
    with pytest.raises(ConfigError, match=r"field 'elder.replay'"):
        with_overrides(base, ["elder.replay=-1"])
    with pytest.raises(ConfigError, match=r"field 'elder.replya'"):
        with_overrides(base, ["elder.replya=3"])
    with pytest.raises(ConfigError, match="expected section.field=value"):
        with_overrides(base, ["elder.replay"])
    with pytest.raises(ConfigError, match="'editor' is not a section"):
        with_overrides(base, ["editor.x=1"])
