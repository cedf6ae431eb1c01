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
