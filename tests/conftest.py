from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from melo_ray.config import EditorConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "castle", "rocket", "forest",
         "violin", "desert", "garden", "bridge", "candle", "meadow", "harbor", "comet", "saddle", "glacier"]
CITIES = ["Oslo", "Lima", "Rome", "Kyiv", "Cairo", "Quito", "Dakar", "Hanoi", "Perth", "Sofia",
          "Bern", "Doha", "Riga", "Baku", "Suva", "Apia", "Male", "Nuuk", "Bonn", "Lome"]


def tiny_config(name: str = "tiny-llama", **sections: dict) -> EditorConfig:
    """A tiny config with some sections overridden."""
    data = load_config(CONFIGS / f"{name}.yaml").model_dump()
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return load_config(data)


def fact_records(start: int = 0, n: int = 10, template: str = "Where does the {w} live?") -> list[dict]:
    return [
        {"id": f"f{i}", "prompt": template.format(w=WORDS[i % len(WORDS)]), "target": CITIES[(i * 7 + 3) % len(CITIES)]}
        for i in range(start, start + n)
    ]


UNRELATED = ["A completely unrelated sentence about numbers.", "zzzz qqqq xxxx", "Tell me a story, please."]


@pytest.fixture()
def tiny_llama_config() -> EditorConfig:
    return tiny_config("tiny-llama")


# Property-based fuzzing (hypothesis): a few examples per property in the suite; the long profile
# (HYPOTHESIS_PROFILE=long, see docs/results.md) is the benchmark-style run.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# One migrated MLflow database for the whole run: creating a sqlite store runs MLflow's schema migrations
# (about 7 s each), copying a migrated file is instant. Each test or module still gets its own copy.
@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_mlflow_db(template: Path, path: Path) -> str:
    """A new, empty MLflow database at `path` (a copy of the migrated template); returns its tracking URI."""
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


# An S3-compatible server (moto) for the object-storage tests; see tests/moto_s3.py.
@pytest.fixture(scope="session")
def s3_server():
    from moto_s3 import start_server

    yield from start_server()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The four standard AWS variables point at the test server (and nothing else of ours does)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
