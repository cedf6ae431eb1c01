"""Edit throughput with the scope test on and off: same backbone, same zsRE edits, one process,
alternating twice. Reliability is measured after each so speed never hides a quality loss.

    OMP_NUM_THREADS=1 python benchmarks/scope_speed.py --edits zsre.parquet --n 60
"""
import argparse
import json
import time

from melo_ray.backbones import load_backbone
from melo_ray.config import load_config, with_overrides
from melo_ray.editors.layers import remove_edit_layers
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.records import read_edit_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--edits", required=True)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    records = read_edit_records(args.edits)[: args.n]
    base = load_config(args.config)
    backbone = load_backbone(base.backbone)
    batch = base.train.batch_size
    for repeat in range(args.repeats):
        for name, overrides in (("scope test on (default)", []), ("scope test off", ["index.scope_verifier=null"])):
            remove_edit_layers(backbone.model)
            editor = MeloEditor(with_overrides(base, overrides), backbone)
            started = time.perf_counter()
            for start in range(0, len(records), batch):
                editor.edit(records[start : start + batch])
            seconds = time.perf_counter() - started
            outputs = editor.generate([r.prompt for r in records], 16)
            reliability = sum(o.output.strip().startswith(r.target) for o, r in zip(outputs, records)) / len(records)
            print(json.dumps({"repeat": repeat, "variant": name, "edits": len(records), "seconds": round(seconds, 1),
                              "edits_per_min": round(len(records) / seconds * 60, 1), "reliability": reliability}),
                  flush=True)


if __name__ == "__main__":
    main()
