"""One decode step of a running batch, with the routing plan built once per change of the batch (now)
against built at every step (before), on the embedded SmolLM2-135M with MELO blocks (issue 34).

The blocks are random rank-1 weights (no training needed to time a forward); half the rows route to a
block, half to the base model, as in mixed traffic. One JSON line:

    OMP_NUM_THREADS=1 python benchmarks/decode_step.py --rows 32 --steps 40
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from melo_ray.config import load_config
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.editors.melo.layer import RoutePlan
from melo_ray.editors.routing import Routing
from melo_ray.serving.decoding import DecodeLoop, Sequence


def _random_blocks(editor: MeloEditor, count: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, layer in editor.layers.items():
        rank = layer.block_rank
        weights[f"{name}.A"] = torch.randn(count, rank, layer.in_features, generator=generator) * 0.02
        weights[f"{name}.B"] = torch.randn(count, layer.out_features, rank, generator=generator) * 0.02
    editor.router.append_blocks(weights)


def _step_times(editor: MeloEditor, rows: int, steps: int, rebuild_plan: bool) -> list[float]:
    tokenizer = editor.backbone.tokenizer
    prompt = tokenizer("Tell me about the history of the city of", add_special_tokens=False).input_ids
    ids = np.where(np.arange(rows) % 2 == 0, np.arange(rows), -1)
    seqs = [Sequence(list(prompt), steps + 8, Routing(ids[i : i + 1], np.zeros(1)), min_new_tokens=steps + 8)
            for i in range(rows)]
    loop = DecodeLoop(editor, rows)
    loop.admit(seqs)
    times = []
    for _ in range(steps):
        if rebuild_plan:  # what every step paid before: the plan built again from the same ids
            editor.router._last_plans = None
        began = time.perf_counter()
        loop.step()
        times.append(time.perf_counter() - began)
    return times[3:]  # the first steps warm caches up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    editor = MeloEditor(load_config(args.config))
    _random_blocks(editor, args.rows)
    cached, rebuilt = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        cached += _step_times(editor, args.rows, args.steps, rebuild_plan=False)
        rebuilt += _step_times(editor, args.rows, args.steps, rebuild_plan=True)
    ids = np.where(np.arange(args.rows) % 2 == 0, np.arange(args.rows), -1)
    began = time.perf_counter()
    for _ in range(1000):
        RoutePlan.build(ids, torch.device("cpu"))
    build_us = (time.perf_counter() - began) * 1000
    print(json.dumps({
        "measurement": "decode_step", "rows": args.rows, "threads": torch.get_num_threads(),
        "step_ms_plan_cached": round(1000 * statistics.median(cached), 3),
        "step_ms_plan_every_step": round(1000 * statistics.median(rebuilt), 3),
        "plan_build_us": round(build_us, 2),
    }))


if __name__ == "__main__":
    main()
