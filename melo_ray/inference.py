"""Forward passes every editor shares; each editor wraps them in its own routing context."""
from __future__ import annotations

import inspect

import torch

from melo_ray.backbones import Backbone
from melo_ray.training import IGNORE, EditBatch


def encode(backbone: Backbone, prompts: list[str], padding_side: str) -> dict[str, torch.Tensor]:
    texts = [backbone.format_prompt(p) for p in prompts]
    encoded = backbone.tokenize(texts, return_tensors="pt", padding=True, padding_side=padding_side)
    return {k: v.to(backbone.device) for k, v in encoded.items()}


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's keyword for the KV cache: `cache` in transformers 5.x (which deprecates the older
    `past_key_values`), `past_key_values` in the releases before it; the output field has the same name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_texts(backbone: Backbone, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy outputs (classification: the predicted label name)."""
    model, tok = backbone.model, backbone.tokenizer
    if backbone.task == "classification":
        predicted = model(**encode(backbone, prompts, "right")).logits.argmax(-1).tolist()
        return [(backbone.labels or [])[i] for i in predicted]
    inputs = encode(backbone, prompts, "left")  # generation continues from the right edge
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    if backbone.task == "causal_lm":
        out = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]


@torch.no_grad()
def next_token_logits(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """Logits after each prompt's last real token (classification: the class logits)."""
    inputs = encode(backbone, prompts, "right")
    model = backbone.model
    if backbone.task == "seq2seq":
        start = torch.full((len(prompts), 1), model.config.decoder_start_token_id)
        return model(**inputs, decoder_input_ids=start).logits[:, -1]
    logits = model(**inputs).logits
    if backbone.task == "classification":
        return logits
    last = inputs["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(prompts)), last]


def _target_logits(backbone: Backbone, batch: EditBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, mask) aligned so that logits[row, t] predicts labels[row, t] where mask holds."""
    model = backbone.model
    if backbone.task == "classification":
        logits = model(**batch.inputs).logits[:, None, :]
        labels = batch.labels[:, None]
        return logits, labels, torch.ones_like(labels, dtype=torch.bool)
    if backbone.task == "seq2seq":
        labels = batch.labels
        decoder = labels.masked_fill(labels == IGNORE, backbone.tokenizer.pad_token_id)
        return model(**batch.inputs, labels=decoder).logits, labels, labels != IGNORE
    labels = batch.labels[:, 1:]
    return model(**batch.inputs).logits[:, :-1], labels, labels != IGNORE


@torch.no_grad()
def target_token_hits(backbone: Backbone, batch: EditBatch) -> list[list[bool]]:
    """Teacher-forced: for each row, whether each target token is the model's argmax."""
    logits, labels, mask = _target_logits(backbone, batch)
    hits = logits.argmax(-1) == labels
    return [hits[row][mask[row]].tolist() for row in range(labels.shape[0])]


@torch.no_grad()
def target_token_argmax(backbone: Backbone, batch: EditBatch) -> list[list[int]]:
    """Teacher-forced: for each row, the model's argmax token at each target position."""
    logits, labels, mask = _target_logits(backbone, batch)
    predicted = logits.argmax(-1)
    return [predicted[row][mask[row]].tolist() for row in range(labels.shape[0])]


@torch.no_grad()
def target_token_nlls(backbone: Backbone, batch: EditBatch) -> list[list[float]]:
    """Teacher-forced negative log-likelihood of each target token, per row."""
    logits, labels, mask = _target_logits(backbone, batch)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = -logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return [nll[row][mask[row]].tolist() for row in range(labels.shape[0])]


@torch.no_grad()
def generate_token_ids(backbone: Backbone, prompts: list[str], max_new_tokens: int,
                       min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy continuations as token ids, each cut at its first end-of-sequence token (generative models).

    `min_new_tokens` holds off end-of-sequence (benchmarks use it to compare equal-length runs)."""
    if backbone.task == "classification":
        raise ValueError("a classification backbone does not generate tokens")
    model, tok = backbone.model, backbone.tokenizer
    inputs = encode(backbone, prompts, "left")
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None, do_sample=False,
        num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    if backbone.task == "causal_lm":
        out = out[:, inputs["input_ids"].shape[1]:]
    else:
        out = out[:, 1:]  # seq2seq: drop the decoder start token
    rows = []
    for row in out.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        rows.append(row)
    return rows
