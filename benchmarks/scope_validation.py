"""Scope models on relations (and a data set) they never saw, at the pair level.

Pairs come from the training splits and the hand-written Wikidata templates (melo_ray.editors.melo.
scope_pairs). Splits:
- leave-relations-out (seed s): every relation family is hashed to train (50%), calibration (20%) or test
  (30%); a pair is tested only when all its families are test families. The cross-encoder trains on the
  train families and sets its threshold on the calibration ones (cross_scope_training.py).
- leave-wiki_recent-out: every wiki_recent pair; the cross-encoder trained with `--exclude-sources
  wiki_recent` never saw a wiki_recent record (train or calibration).

Per split and source: acceptance of rewordings (zsRE-style questions and CounterFact-style cloze
prompts apart), subject-alias rewordings, and false-accept of same-subject / other-relation,
same-relation / other-subject, namesake and inverse pairs; re-asking probes (a wiki_recent locality
probe asking the edited relation) are counted apart, never as negatives. Scorers: today's verifier at
its shipped threshold, the same verifier at the threshold the calibration families place (the
cross-encoder's rule), and each cross-encoder file given. Also: milliseconds to score a batch of 32
queries against 4 candidates each on this CPU.

Caveat printed with the table: today's verifier was trained on all of zsRE train-1k, CounterFact train and
wiki_recent[:285], so on those sources "unseen relations" holds only for the cross-encoder; the
template rows are new text to both.

    OMP_NUM_THREADS=1 python benchmarks/scope_validation.py --seed 1 --cap 1000 --json runs/scope_validation_verifier.json
    OMP_NUM_THREADS=1 python benchmarks/scope_validation.py --seed 1 --cap 1000 --skip-verifier \
        --cross runs/cross_scope_seed1.safetensors --merge runs/scope_validation_verifier.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from melo_ray.editors.melo.scope.cross_encoder import CrossScopeModel
from melo_ray.editors.melo.scope.training.cross_encoder_training import calibrate, capped
from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.verifier import BUILTIN_VERIFIER, ScopeVerifier, load_verifier
from melo_ray.editors.melo.scope.training.pairs import DataPaths, Pair, all_pairs, leave_dataset_out, leave_relations_out
from melo_ray.editors.melo.scope.training.verifier_training import cached_embed

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SHIPPED_THRESHOLD = ScopeVerifier.load(BUILTIN_VERIFIER).calibrated_threshold  # stored in the shipped file

# (row name, which pairs): rates are of acceptance; the first three want it high, the rest low
METRICS = (
    ("reword, zsRE-style (questions)", lambda p: p.kind == "reword" and p.style == "question"),
    ("reword, CounterFact-style (cloze)", lambda p: p.kind == "reword" and p.style == "cloze"),
    ("alias reword", lambda p: p.kind == "alias"),
    ("FA same subject / other relation", lambda p: p.kind == "subject_other_relation"),
    ("FA same relation / other subject", lambda p: p.kind == "relation_other_subject"),
    ("FA namesake (same relation)", lambda p: p.kind == "namesake"),
    ("FA inverse / directional", lambda p: p.kind == "inverse"),
    ("re-asking probes accepted (apart)", lambda p: p.kind == "reasking"),
)
TARGETS = {"reword, zsRE-style (questions)": ">= 0.92", "reword, CounterFact-style (cloze)": ">= 0.97",
           "alias reword": ">= 0.75", "FA same subject / other relation": "<= 0.005",
           "FA same relation / other subject": "<= 0.003", "FA namesake (same relation)": "<= 0.003",
           "FA inverse / directional": "<= 0.01"}


class VerifierScorer:
    """Today's verifier: keys of both prompts (its views), its logit; identical prompts pass."""

    def __init__(self, source: str, cache: Path) -> None:
        self.verifier = load_verifier(source)
        self.keys = scoped_keys_for(self.verifier, SentenceEncoderKeys())
        self.cache = cache

    def logits(self, pairs: list[Pair]) -> np.ndarray:
        texts = sorted({t for p in pairs for t in (p.a, p.b)})
        row = {t: i for i, t in enumerate(texts)}
        keys, _ = cached_embed(texts, self.keys, self.cache)
        return self.verifier.logits(keys[[row[p.a] for p in pairs]], keys[[row[p.b] for p in pairs]])

    def batch_ms(self, queries: list[str], candidates: list[str]) -> tuple[float, float]:
        """(wall, CPU) ms of a batch of queries keyed (every view) and scored against 4 stored candidate keys each."""
        stored = self.keys.keys(candidates)
        started, cpu = time.perf_counter(), time.process_time()
        query_keys = self.keys.keys(queries)
        self.verifier.logits(np.repeat(query_keys, 4, axis=0), stored)
        return (time.perf_counter() - started) * 1000, (time.process_time() - cpu) * 1000


class CrossScorer:
    def __init__(self, path: Path) -> None:
        self.model = CrossScopeModel.load(path)

    def logits(self, pairs: list[Pair]) -> np.ndarray:
        return self.model.logits([p.a for p in pairs], [p.b for p in pairs])

    def batch_ms(self, queries: list[str], candidates: list[str]) -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        self.model.logits(candidates, [q for q in queries for _ in range(4)], batch_size=len(candidates))
        return (time.perf_counter() - started) * 1000, (time.process_time() - cpu) * 1000


def rates(accepted: np.ndarray, pairs: list[Pair]) -> dict[str, tuple[float, int]]:
    out = {}
    for name, wanted in METRICS:
        rows = np.array([wanted(p) for p in pairs], bool)
        if rows.any():
            out[name] = (float(accepted[rows].mean()), int(rows.sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="leave-relations-out split seed (the cross-encoder's)")
    parser.add_argument("--exclude-sources", default="wiki_recent",
                        help="sources the cross-encoder never trained or calibrated on (as its training run)")
    parser.add_argument("--cross", type=Path, action="append", default=[], help="cross-encoder file(s)")
    parser.add_argument("--verifier", default="builtin")
    parser.add_argument("--verifier-name", default="today's verifier", help="its column's name")
    parser.add_argument("--cap", type=int, default=1500, help="test pairs per (source, kind) at most")
    parser.add_argument("--keys-cache", type=Path, default=ROOT / "runs/scope-validation-keys.npz")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here too")
    parser.add_argument("--skip-verifier", action="store_true", help="score only the cross-encoder files")
    parser.add_argument("--verifier-cost", action="store_true",
                        help="with --skip-verifier: still measure the verifier's cost per batch (not its accuracy)")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="a --json of an earlier run (same seed) whose columns join the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = all_pairs(DataPaths.under(DATA))
    relations_out = leave_relations_out(pairs, args.seed, tuple(s for s in args.exclude_sources.split(",") if s))
    splits = [relations_out, leave_dataset_out(pairs, "wiki_recent", args.seed)]
    scorers: dict[str, object] = {} if args.skip_verifier else {
        args.verifier_name: VerifierScorer(args.verifier, args.keys_cache)}
    for path in args.cross:
        scorers[f"cross-encoder {path.name}"] = CrossScorer(path)
    calibration = capped(list(relations_out.calibration), 800, args.seed)
    results: dict = {"seed": args.seed, "splits": {}, "thresholds": {}, "batch_ms": {}}
    for earlier in args.merge:  # columns measured by an earlier run of this script on the same split
        old = json.loads(earlier.read_text())
        if old["seed"] != args.seed:
            raise SystemExit(f"{earlier}: seed {old['seed']}, not {args.seed}")
        for key in ("thresholds", "batch_ms"):
            results[key].update(old[key])
        for split, sources in old["splits"].items():
            for source, metrics in sources.items():
                for metric, cells in metrics.items():
                    results["splits"].setdefault(split, {}).setdefault(source, {}).setdefault(metric, {}).update(cells)
    if args.verifier_cost and args.skip_verifier:  # its cost alone, beside the cross-encoders' (same run)
        measure_cost(results, "today's verifier", VerifierScorer(args.verifier, args.keys_cache), calibration)
    for name, scorer in scorers.items():
        columns = {}
        if isinstance(scorer, VerifierScorer):
            stored = scorer.verifier.calibrated_threshold  # the file's own (the shipped one: 34.94)
            columns[f"{name} @ {stored:.3f} (its file's)"] = stored if stored is not None else SHIPPED_THRESHOLD
            columns[f"{name} @ calibrated"] = calibrate(scorer.logits(calibration), calibration)[0]
        else:
            columns[f"{name} @ {scorer.model.threshold:.3f} (calibrated)"] = scorer.model.threshold
            columns[f"{name} @ 0 (p = 0.5)"] = 0.0  # the loss's own decision point, set before any test
        results["thresholds"].update(columns)
        for split in splits:
            test = capped(list(split.test), args.cap, args.seed)
            logits = scorer.logits(test)
            for column, threshold in columns.items():
                for source in ["all", *sorted({p.source for p in test})]:
                    chosen = [i for i, p in enumerate(test) if source in ("all", p.source)]
                    for metric, (rate, n) in rates(logits[chosen] >= threshold, [test[i] for i in chosen]).items():
                        results["splits"].setdefault(split.name, {}).setdefault(source, {}).setdefault(
                            metric, {})[column] = {"rate": rate, "n": n}
        measure_cost(results, name, scorer, calibration)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print_table(results, args.cap)


def measure_cost(results: dict, name: str, scorer, pairs: list[Pair]) -> None:
    """Median wall and CPU (this process) ms of 5 batches of 32 queries x 4 candidates: on a shared
    machine the CPU time is the figure that does not depend on the neighbours' load."""
    queries = [p.b for p in pairs[:32]]
    candidates = [p.a for p in pairs[:128]]
    scorer.batch_ms(queries, candidates)  # warm up
    wall, cpu = zip(*[scorer.batch_ms(queries, candidates) for _ in range(5)])
    results["batch_ms"][name] = float(np.median(wall))
    results.setdefault("batch_cpu_ms", {})[name] = float(np.median(cpu))


def print_table(results: dict, cap: int) -> None:
    columns = list(results["thresholds"])
    print(f"Splits: {', '.join(results['splits'])}; test pairs capped at {cap} per (source, kind). Cells: rate (pairs).")
    print("Today's verifier trained on all of zsRE train-1k, CounterFact train and wiki_recent[:285]: on those "
          "sources its relations are not unseen.\n")
    print("| split | source | metric | target | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for split, sources in results["splits"].items():
        for source, metrics in sources.items():
            for metric, _ in METRICS:
                cells = metrics.get(metric)
                if cells:
                    print(f"| {split} | {source} | {metric} | {TARGETS.get(metric, '')} | " + " | ".join(
                        f"{cells[c]['rate']:.4f} ({cells[c]['n']})" if c in cells else "" for c in columns) + " |")
    print("\nThresholds:", json.dumps({k: round(v, 3) for k, v in results["thresholds"].items()}))
    print("ms per batch of 32 queries x 4 candidates (CPU, 1 thread, a shared machine), wall:",
          json.dumps({k: round(v, 1) for k, v in results["batch_ms"].items()}),
          "CPU:", json.dumps({k: round(v, 1) for k, v in results.get("batch_cpu_ms", {}).items()}))


if __name__ == "__main__":
    main()
