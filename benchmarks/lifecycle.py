"""Store operations on a real-sized store: revert one edit of N, rollback, compaction, PEFT export.

Builds an N-edit MELO store on the embedded SmolLM2-135M from CounterFact (blocks of 10; training cut
to `--num-iter` steps because only the store's size matters here, not edit quality), then times
each operation and checks that a revert changes no other output (next-token logits of a sample of
edited prompts and NQ questions, compared exactly).

    OMP_NUM_THREADS=1 python benchmarks/lifecycle.py --n 2000 --out runs/lifecycle
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from melo_ray import operations
from melo_ray.config import load_config, with_overrides
from melo_ray.data import convert
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.store import SnapshotStore

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--num-iter", type=int, default=2)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--out", default="runs/lifecycle")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    config = with_overrides(load_config(ROOT / "configs" / "smollm2-135m.yaml"), [f"train.num_iter={args.num_iter}"])
    records = convert("counterfact", DATA / "counterfact-mend-splits" / "counterfact-edit.json", limit=args.n).records
    nq = [json.loads(line)["question"] for line in (DATA / "nq-open" / "NQ-open.dev.jsonl").read_text().splitlines()[:50]]

    started = time.perf_counter()
    editor = MeloEditor(config)
    for i in range(0, len(records), 10):
        editor.edit(records[i : i + 10])
    store = SnapshotStore(out / "store", keep=10)
    editor.publish(store)
    build = time.perf_counter() - started

    step = max(1, len(records) // args.sample)
    prompts = [r.prompt for r in records[::step]][: args.sample] + nq
    victim = records[::step][1].id
    before = editor.next_token_logits(prompts)

    timed = {}
    t = time.perf_counter()
    result = operations.revert(store.uri, [victim])
    timed["revert_seconds"] = time.perf_counter() - t
    timed["revert_load_seconds"] = result["load_seconds"]
    after_editor, _ = operations.load_latest(store.uri)
    after = after_editor.next_token_logits(prompts)
    changed = [i for i in range(len(prompts)) if not torch.equal(after[i], before[i])]
    t = time.perf_counter()
    operations.rollback(store.uri, to=store.versions()[0])  # the version the build published
    timed["rollback_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    operations.revert(store.uri, [r.id for r in records[:10]])  # every edit of block 0
    compacted = operations.compact(store.uri)
    timed["revert_10_and_compact_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    exported = operations.export(store.uri, out / "peft")
    timed["export_seconds"] = time.perf_counter() - t
    peft_diff = _peft_max_abs_diff(store, out / "peft", blocks=(1, len(exported["adapters"]) // 2))
    manifest = store.read_manifest()
    print(json.dumps({
        "edits": len(records), "blocks": manifest["stats"]["blocks"], "build_seconds": round(build, 1),
        "snapshot_mb": round(sum(f["bytes"] for f in manifest["files"].values()) / 2**20, 1),
        **{k: round(v, 2) for k, v in timed.items()},
        "outputs_checked": len(prompts), "changed_outputs": [prompts[i] for i in changed],
        "reverted_prompt_changed": prompts.index(records[::step][1].prompt) in changed,
        "compaction": {k: compacted[k] for k in ("dropped_blocks", "bytes_before", "bytes_after")},
        "exported_adapters": len(exported["adapters"]), "peft_max_abs_logit_diff": peft_diff,
    }))


def _peft_max_abs_diff(store: SnapshotStore, folder: Path, blocks: tuple[int, ...]) -> float:
    """Our block's next-token logits against the exported adapter under real peft, on its edits' prompts."""
    import numpy as np
    from peft import PeftModel

    from melo_ray.backbones import load_backbone
    from melo_ray.editors.routing import Routing
    from melo_ray.export import adapter_name
    from melo_ray.inference import next_token_logits

    editor, _ = operations.load_latest(store.uri)
    routing = json.loads((folder / "routing.json").read_text())
    worst = 0.0
    for block in blocks:
        ids = [e["id"] for e in routing["edits"] if e["adapter"] == adapter_name(block)][:5]
        prompts = [editor.edit_log[i].prompt for i in ids]
        with editor.routed(Routing(np.full(len(prompts), block), np.zeros(len(prompts)))):
            ours = next_token_logits(editor.backbone, prompts)
        base = load_backbone(editor.config.backbone)
        base.model = PeftModel.from_pretrained(base.model, str(folder / adapter_name(block))).eval()
        worst = max(worst, float((next_token_logits(base, prompts) - ours).abs().max()))
    return worst


if __name__ == "__main__":
    main()
