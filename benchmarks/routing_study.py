"""Where each rephrasing of a lifelong zsRE stream is routed, with no training: keys of the first N
records go into the index in order (each edit its own block, as the default config trains them), and
every record's rephrasing and synthetic same-subject probe is routed through it.

Reports, per routing rule: reliability and generality as routing alone allows them (routed to a block
whose target is the record's), generality on the records no later one re-asks with another target
(`evaluation.superseded`), the share of probes routed to any block and to an edit whose subject the
probe names (a subject the stream edits, not a leak across subjects), the share of probes routed among
those that ask no edited question (`evaluation.EditedQuestions`: the probe names an edited subject and
expects that edit's true answer; the evaluation leaves such probes out of locality), where rephrasings
land, and the median time to route the rephrasings in batches of 32 (index search and scope test, keys
given). `--candidates` adds rows for the default rule with other numbers of HNSW candidates. The
default rule ranks the members that pass by how closely they name what the query names
(`index.scope_prefer_same_names`) and raises the threshold by ln(k) for the k members naming what the
query names most closely (`index.scope_namesake_bar`); `--rules default,flat-bar,score-alone` measures them on
and off, `loose-bar` the bar counting every member from names cosine 0.5 (near-namesakes too), and
`prompt-reach` a cluster holding only queries whose whole-prompt view lies in its radius (by default
the focus view, the last sentence, reaches too: `index.scope_focus_reach`).

    OMP_NUM_THREADS=1 python benchmarks/routing_study.py --n 1000
    OMP_NUM_THREADS=1 python benchmarks/routing_study.py --dataset counterfact --probes neighbour --names-gate 0.1,0.2
    OMP_NUM_THREADS=1 python benchmarks/routing_study.py --dataset counterfact --probes neighbour --n 10000 --rules default,score-alone --keys-cache runs/cf10k-keys.npz

`--names-gate` adds rows for the default rule with the verifier's names gate set to each value (the
scope test refuses two prompts that both name someone, with names' character-trigram cosine below it);
the shipped verifier carries 0.2.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melo_ray.data import convert
from melo_ray.editors.melo.scope.index import NeuronIndex
from melo_ray.editors.melo.scope.keys import scoped_keys_for
from melo_ray.editors.melo.scope.verifier import load_verifier
from melo_ray.editors.melo.scope.decision import ScopeTest
from melo_ray.editors.routing import ScopeDecision
from melo_ray.editors.melo.scope.training.verifier_training import cached_embed, embed
from melo_ray.evaluation import EditedQuestions, superseded

from core_quality import DATA, SOURCES  # the same records as core_quality.py (this script's folder is on sys.path)

DEFAULT_RULE = "latest edit of the question (default)"
SCORE_ALONE_RULE = "the same, ranked by the verifier's score alone, one flat threshold"
FLAT_BAR_RULE = "the same, one flat threshold"
LOOSE_BAR_RULE = "the same, k counting every member from names cosine 0.5"
PROMPT_REACH_RULE = "the same, reached by the whole prompt's view alone (previous default)"
ROUTED_SOURCES = {**SOURCES, "wiki_recent": ("knowedit", DATA / "knowedit/benchmark_wiki_recent_recent_train.json"),
                  "zsre-train": ("zsre", DATA / "zsre-mend-train-1k/zsre_mend_train-1k.json")}


@dataclass(frozen=True)
class Rule:
    threshold: float
    conflict: float | None = None  # scope_conflict_threshold
    latest: bool = True  # scope_latest_of_question
    names_gate: float | None = None  # None: the verifier's own
    candidates: int = 8
    prefer_names: bool = True  # scope_prefer_same_names
    namesake_bar: float = 1.0  # scope_namesake_bar
    closest_namesakes: bool = True  # False: the bar's k counts every member from NAMESAKE_COSINE
    focus_reach: bool = True  # scope_focus_reach


def routing_rules(t: float) -> dict[str, Rule]:
    """The index's routing rules, around the threshold t."""
    return {
        "best-scoring member": Rule(t, latest=False, prefer_names=False),
        f"supersede at logit {t + 1.5:g}": Rule(t, t + 1.5, False, prefer_names=False),
        f"supersede at logit {t:g}": Rule(t, t, False, prefer_names=False),
        DEFAULT_RULE: Rule(t),
        SCORE_ALONE_RULE: Rule(t, prefer_names=False, namesake_bar=0.0),
        FLAT_BAR_RULE: Rule(t, namesake_bar=0.0),
        LOOSE_BAR_RULE: Rule(t, closest_namesakes=False),
        PROMPT_REACH_RULE: Rule(t, focus_reach=False),
        f"the same, threshold {t - 1:g}": Rule(t - 1),
        f"the same, threshold {t - 2:g}": Rule(t - 2),
        # no comma in these names, so `--rules` can pick them
        f"flat bar at threshold {t + 0.5:g}": Rule(t + 0.5, namesake_bar=0.0),
        f"flat bar at threshold {t + 1:g}": Rule(t + 1, namesake_bar=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0, help="skip the data set's first records (wiki_recent: 285, "
                        "the shipped verifier's training records)")
    parser.add_argument("--verifier", default="builtin")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the default rule's threshold (default: the one stored in the verifier file)")
    parser.add_argument("--r-init", type=float, default=0.7, help="index.r_init (the shipped config's)")
    parser.add_argument("--cluster-per-edit", action=argparse.BooleanOptionalAction, default=True,
                        help="index.scope_cluster_per_edit; --no-cluster-per-edit --r-init 0.35 is the previous default")
    parser.add_argument("--dataset", choices=sorted(ROUTED_SOURCES), default="zsre")
    parser.add_argument("--probes", choices=["subject", "neighbour"], default="subject", help="locality probes routed")
    parser.add_argument("--names-gate", default="", help="comma-separated gate values for extra rows")
    parser.add_argument("--candidates", default="", help="comma-separated candidate counts for extra default-rule rows")
    parser.add_argument("--keys-cache", type=Path, default=None,
                        help="npz of the keys (written if absent or stale): reruns skip the MiniLM encoder")
    parser.add_argument("--rules", default="", help="comma-separated rule names to run (default: all); "
                        "'default' is the shipped rule, 'flat-bar' the same with index.scope_namesake_bar 0, "
                        "'loose-bar' the bar counting near-namesakes too, 'score-alone' with neither the bar nor "
                        "index.scope_prefer_same_names. The names-gate rows always run.")
    args = parser.parse_args()
    fmt, path = ROUTED_SOURCES[args.dataset]
    # zsRE: probes drawn from the whole file, as the T = 1000 evaluation does; CounterFact: its first n records
    limit = None if args.dataset.startswith("zsre") else args.start + args.n
    records = [r for r in convert(fmt, Path(path), limit=limit, subject_probes=2).records[args.start : args.start + args.n]
               if r.rephrases or r.alias_rephrases]  # wiki_recent: its subject-alias rewordings
    verifier = load_verifier(args.verifier)
    if args.threshold is None:
        args.threshold = verifier.calibrated_threshold
    probe_list = [p for r in records for p in r.probes(args.probes)]
    probe_texts = [p.prompt for p in probe_list]
    texts = [r.prompt for r in records] + [(r.rephrases or r.alias_rephrases)[0] for r in records] + probe_texts
    key_function = scoped_keys_for(verifier)
    keys = cached_embed(texts, key_function, args.keys_cache)[0] if args.keys_cache else embed(texts, key_function)[0]
    prompts, rephrasings, probes = np.split(keys, [len(records), 2 * len(records)])
    asked = EditedQuestions(records)
    unasked = np.array([not asked.asks(p) for p in probe_list], bool)
    latest = ~np.array(superseded(records))
    print(f"{len(records)} records, {1 - latest.mean():.3f} superseded, {len(probes)} {args.probes} probes, "
          f"{1 - unasked.mean():.4f} of them asking an edited question")
    def right(blocks: np.ndarray) -> np.ndarray:
        return np.array([b >= 0 and records[b].target == records[i].target for i, b in enumerate(blocks)])

    print("\n| rule | reliability (routed) | generality (routed) | not superseded (routed) | probes routed "
          "| probes routed to an edit of a subject they name | probes asking no edited question, routed "
          "| rephrasings: own edit / other edit, same subject / other edit, other subject / none | ms per batch of 32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    aliases = {"default": DEFAULT_RULE, "score-alone": SCORE_ALONE_RULE, "flat-bar": FLAT_BAR_RULE,
               "loose-bar": LOOSE_BAR_RULE, "prompt-reach": PROMPT_REACH_RULE}
    wanted = {aliases.get(n, n) for n in filter(None, args.rules.split(","))}
    rules = {n: rule for n, rule in routing_rules(args.threshold).items() if not wanted or n in wanted}
    for value in filter(None, args.names_gate.split(",")):
        rules[f"default, names gate {value}"] = Rule(args.threshold, names_gate=float(value))
    for value in filter(None, args.candidates.split(",")):
        rules[f"default, {value} candidates"] = Rule(args.threshold, candidates=int(value))
    misses = []
    for name, rule in rules.items():
        judge = verifier if rule.names_gate is None else verifier.with_names_gate(rule.names_gate)
        index = NeuronIndex(prompts.shape[1], "cosine", args.r_init, candidates=rule.candidates,
                            scope=ScopeTest(judge, rule.threshold, rule.conflict, rule.latest, rule.prefer_names,
                                            rule.namesake_bar, rule.closest_namesakes, rule.focus_reach),
                            cluster_per_edit=args.cluster_per_edit)
        for i, record in enumerate(records):
            index.add(prompts[i], record.target, i, record.id)
        reliability = right(index.search(prompts).block_ids)
        searched = index.search(rephrasings)
        blocks = searched.block_ids
        misses.append((name, searched.decisions, blocks))
        probe_blocks = index.search(probes).block_ids if len(probes) else np.zeros(0, np.int64)
        generality = right(blocks)
        own = blocks == np.arange(len(records))
        other = (blocks >= 0) & ~own
        same_subject = np.array([o and (records[b].subject or "").casefold() == (records[i].subject or "").casefold()
                                 for i, (b, o) in enumerate(zip(blocks, other))])
        routed_probes = (probe_blocks >= 0).mean() if len(probes) else float("nan")
        # a probe that names the subject of the edit it reached asks about an edited subject: with a
        # large stream, CounterFact's neighbour prompts often name a subject another record edits
        own_subject = np.array([b >= 0 and bool(records[b].subject)
                                and records[b].subject.casefold() in text.casefold()
                                for text, b in zip(probe_texts, probe_blocks)], bool)
        to_named = own_subject.mean() if len(probes) else float("nan")
        unasked_routed = (probe_blocks[unasked] >= 0).mean() if unasked.any() else float("nan")
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            for start in range(0, len(rephrasings), 32):
                index.search(rephrasings[start : start + 32])
            seconds.append((time.perf_counter() - started) / -(-len(rephrasings) // 32))
        print(f"| {name} | {reliability.mean():.3f} | {generality.mean():.3f} | {generality[latest].mean():.3f} | "
              f"{routed_probes:.4f} | {to_named:.4f} | {unasked_routed:.4f} | {own.mean():.3f} / {same_subject.mean():.3f} / {(other & ~same_subject).mean():.3f} / "
              f"{(blocks < 0).mean():.3f} | {np.median(seconds) * 1000:.2f} |", flush=True)
    print_misses(misses, records)


def print_misses(misses: list[tuple[str, tuple[ScopeDecision, ...], np.ndarray]], records: list) -> None:
    """Why rephrasings that reach no block reach none: which rule decided, and for the bar, whether the
    member that came closest was the record's own edit and how far below the bar it scored."""
    assert {"out_of_reach", "names_gate", "below_bar"} <= ScopeDecision.RULES.keys()  # the rules counted below
    print("\n| rule | rephrasings routed nowhere | out of reach | names gate | below the bar: own edit closest "
          "| below the bar: another edit closest | own edit's logit under its bar: quartiles |")
    print("|---|---|---|---|---|---|---|")
    for name, decisions, blocks in misses:
        nowhere = np.flatnonzero(blocks < 0)
        reasons = [decisions[i].rule for i in nowhere]
        own = [decisions[i].bar - decisions[i].score for i in nowhere
               if decisions[i].rule == "below_bar" and decisions[i].edit_id == records[i].id]
        below = sum(r == "below_bar" for r in reasons)
        gaps = np.percentile(own, [25, 50, 75]) if own else [float("nan")] * 3
        n = len(records)
        print(f"| {name} | {len(nowhere) / n:.3f} | {reasons.count('out_of_reach') / n:.3f} | "
              f"{reasons.count('names_gate') / n:.3f} | {len(own) / n:.3f} | {(below - len(own)) / n:.3f} | "
              f"{' / '.join(f'{g:.2f}' for g in gaps)} |")


if __name__ == "__main__":
    main()
