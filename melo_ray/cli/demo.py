"""The README's first command: a real bulk edit of zsRE facts into the embedded model through the Ray
job (the same code path as `python -m pipelines.bulk_edit`), then queries that show before/after."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from melo_ray.cli.quiet import library_output_to
from melo_ray.config import load_config
from melo_ray.data import convert
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.metrics import starts_with_target as edit_success
from pipelines.bulk_edit.job import BulkEditJob
from melo_ray.records import write_parquet
from melo_ray.store import SnapshotStore

ZSRE = "zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json"
NQ = "nq-open/NQ-open.dev.jsonl"


def _short(text: str, width: int = 38) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(data_dir: Path, n: int, config_path: str, out: Path) -> int:
    zsre_file = data_dir / ZSRE
    if not zsre_file.is_file():
        print(f"demo: {zsre_file} not found; pass --data PATH_TO/shared/data", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "demo.log"
    print(f"melo-ray demo: {n} zsRE facts into the embedded SmolLM2-135M through the Ray bulk-edit job "
          f"(library output: {log_file})", flush=True)
    with library_output_to(log_file) as terminal:
        return _run(data_dir, n, config_path, out, terminal)


def _run(data_dir: Path, n: int, config_path: str, out: Path, terminal: TextIO) -> int:
    def say(line: str = "") -> None:
        print(line, file=terminal, flush=True)

    records = convert("zsre", data_dir / ZSRE, limit=n).records
    unrelated = [json.loads(line)["question"] for line in (data_dir / NQ).read_text().splitlines()[:3]]
    config = load_config(config_path)
    say(f"loading the model ({config_path}) and answering before the edit ...")
    editor = MeloEditor(config)
    prompts = [r.prompt for r in records]
    before = editor.generate(prompts + unrelated)

    store_dir = out / "store"
    shutil.rmtree(store_dir, ignore_errors=True)  # a demo starts from the base model every time
    write_parquet(records, out / "edits.parquet")
    say("bulk edit on Ray: stream -> trainer actor -> writer actor -> snapshot store ...")
    started = time.perf_counter()
    summary = BulkEditJob(config, str(out / "edits.parquet"), str(store_dir), "demo").run()
    seconds = time.perf_counter() - started
    store = SnapshotStore(store_dir)
    manifest, files = store.read()
    editor.restore_files(manifest, files, str(store_dir))  # query the published snapshot
    after = editor.generate(prompts + [r.rephrases[0] for r in records if r.rephrases] + unrelated)
    stats = manifest["stats"]
    say()
    say(f"{'prompt':40} {'target':14} {'before':24} {'after':24} edit")
    successes = 0
    for record, old, new in zip(records, before, after):
        ok = edit_success(new.output, record.target)
        successes += ok
        say(f"{_short(record.prompt, 40):40} {_short(record.target, 14):14} {_short(old.output, 24):24} "
            f"{_short(new.output, 24):24} {new.edit_id}{'' if ok else '  (miss)'}")
    rephrased = after[len(records) : len(after) - len(unrelated)]
    general = sum(edit_success(g.output, r.target) for g, r in zip(rephrased, [r for r in records if r.rephrases]))
    say(f"\nrephrasings (never trained on): {general}/{len(rephrased)} give the new target")
    unchanged = 0
    say("\nunrelated questions (must not change):")
    for old, new in zip(before[len(records):], after[len(after) - len(unrelated):]):
        same = old.output == new.output
        unchanged += same
        say(f"  {_short(old.prompt, 50):50} -> {_short(new.output, 30):30} edit={new.edit_id} "
            f"{'unchanged' if same else 'CHANGED'}")
    say(f"\nedit success {successes}/{len(records)}, unrelated unchanged {unchanged}/{len(unrelated)}; "
        f"{summary.state.edits_applied} edits committed as snapshot v{manifest['version']} in {seconds:.1f} s, "
        f"Ray start included (blocks={stats['blocks']}, rejected={summary.state.rejected})")
    say(f"snapshot store: {store_dir}  (query it: melo-ray generate --snapshot {store_dir} --prompts PROMPTS.jsonl "
        f"--json; serve it: melo-ray serve --snapshots {store_dir})")
    return 0 if successes == len(records) and unchanged == len(unrelated) else 1
