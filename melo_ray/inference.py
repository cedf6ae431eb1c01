"""Forward passes every editor shares; each editor wraps them in its own routing context."""
from __future__ import annotations

import torch

from melo_ray.backbones import Backbone
from melo_ray.records import EditRecord
from melo_ray.training import IGNORE, build_batch


def encode(backbone: Backbone, prompts: list[str], padding_side: str) -> dict[str, torch.Tensor]:
    texts = [backbone.format_prompt(p) for p in prompts]
    return dict(backbone.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side))


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


@torch.no_grad()
def target_token_hits(backbone: Backbone, records: list[EditRecord]) -> list[list[bool]]:
    """Teacher-forced: for each record, whether each target token is the model's argmax."""
    batch = build_batch(backbone, records, append_eos=False)
    model = backbone.model
    if backbone.task == "classification":
        predicted = model(**batch.inputs).logits.argmax(-1)
        return [[bool(p == t)] for p, t in zip(predicted, batch.labels)]
    if backbone.task == "seq2seq":
        labels = batch.labels
        decoder = labels.masked_fill(labels == IGNORE, backbone.tokenizer.pad_token_id)
        predicted = model(**batch.inputs, labels=decoder).logits.argmax(-1)
        mask = labels != IGNORE
    else:
        predicted = model(**batch.inputs).logits.argmax(-1)[:, :-1]
        labels = batch.labels[:, 1:]
        mask = labels != IGNORE
    hits = predicted == labels
    return [hits[row][mask[row]].tolist() for row in range(len(records))]
