"""Lifelong-editing protocol: T edits arrive in order, in batches; metrics are taken on the final
state (and, optionally, every K edits for curves). Every editor is measured the same way.

Locality is measured apart for each kind of input the edits must leave alone: unrelated questions
(`locality_nq`: the NQ questions passed in and the records' own "nq" probes), the same relation asked of
another subject (`locality_neighbours`) and another relation of the edited subject (`locality_subject`).
A probe whose prompt is itself one an edit is meant to change (an edited prompt or any of its rephrasings)
is left out: a changed output there is the edit working, not leaking. So is a probe that asks an edited
question in other words: it names an edited subject and expects that edit's true answer (the data's
`question` label; CounterFact's neighbour prompts name other subjects, and a long stream edits many of
them). `measure(history=...)` takes these from the whole history when quality is measured on a sample.

Data that labels its questions (`EditRecord.question`; zsRE asks many questions several times, in other
words and with other targets) also gives `superseded`, the share of edits whose question a later edit
asks again with another target, and `generality_latest`, generality on the others: a rewording of a
superseded edit has no one right answer (its own target, or the later one), so it is scored apart.

Beside the generation metrics, each quality metric is also given as teacher-forced token accuracy the way
EasyEdit computes it, so figures can sit beside published ones: reliability (`token_accuracy`) and
generality on prompt + target, locality as the share of the probe's answer tokens (or, for a probe
without one, the base model's output) where the edited model's argmax token is the unedited model's."""
from __future__ import annotations

import json
import logging
import math
import random
import re
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from melo_ray import metrics
from melo_ray.records import EditRecord, LocalityProbe, question_label

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "reliability", "reliability_f1", "token_accuracy", "generality", "generality_f1", "generality_latest",
    "superseded", "generality_alias",
    "portability", "locality_nq", "locality_neighbours", "locality_subject",
    # teacher-forced token accuracy as the common toolkit (EasyEdit) scores it, beside the generation metrics
    "generality_token_accuracy", "locality_nq_token_accuracy", "locality_neighbours_token_accuracy",
    "locality_subject_token_accuracy",
)
# Perplexities (WikiBio hallucination protocol): of the edited targets given their prompts, of the
# answers of the records' "neighbour" and "nq" probes (ppl_locality) and of their "subject" probes
# (ppl_subject), after editing and on the base model.
PPL_NAMES = ("ppl_edited", "ppl_locality", "ppl_locality_base", "ppl_subject", "ppl_subject_base")


@dataclass(frozen=True)
class EvalPlan:
    batch_size: int
    every: int | None = None  # measure every K edits as well as at the end
    max_new_tokens: int = 16
    # Measure quality on this many of the T records (drawn with `sample_seed` before editing; every record
    # is still applied in order): at T = 5000 the probes of every record cost more than the edits do.
    # Scope, supersession and edited questions are still decided on the whole history. The NQ list is
    # asked whole, so in locality_nq it weighs more beside a sample's own "nq" probes than in a full run.
    sample: int | None = None
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample: {self.sample} records; measure at least 1")

    def measured(self, records: list[EditRecord]) -> list[int]:
        """Positions of the records quality is measured on, ascending: all of them, or the seeded sample."""
        if self.sample is None or self.sample >= len(records):
            return list(range(len(records)))
        return sorted(random.Random(self.sample_seed).sample(range(len(records)), self.sample))


@dataclass(frozen=True)
class _Baseline:
    """Base-model outputs that locality is measured against: of the NQ questions, in order, and of the
    records' locality probes by prompt, one map per kind."""

    nq: list[str]
    neighbours: dict[str, str]
    subject: dict[str, str] = field(default_factory=dict)
    nq_probes: dict[str, str] = field(default_factory=dict)


def _outputs(editor: Any, prompts: list[str], max_new: int, *, base: bool = False) -> list[str]:
    return [g.output for g in editor.generate(prompts, max_new, base=base)] if prompts else []


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _edit_scope(records: list[EditRecord]) -> set[str]:
    """Prompts the edits are meant to change: each edited prompt and all its rephrasings."""
    return {p for r in records for p in (r.prompt, *r.rephrases, *r.train_rephrases, *r.alias_rephrases)}


class EditedQuestions:
    """The labelled questions a history of edits asks, found in a probe by an edited subject its prompt
    names and the true answer it expects."""

    def __init__(self, records: list[EditRecord]) -> None:
        self.labels = {r.question for r in records if r.question}
        self.subjects: dict[str, set[str]] = defaultdict(set)  # first word -> edited subjects (casefolded)
        for record in records:
            words = re.findall(r"\w+", record.subject.casefold()) if record.question and record.subject else []
            if words:
                self.subjects[words[0]].add(record.subject.casefold())

    def asks(self, probe: LocalityProbe) -> bool:
        if not probe.answer or not self.labels:
            return False
        text = probe.prompt.casefold()
        return any(subject in text and question_label(subject, probe.answer) in self.labels
                   for word in set(re.findall(r"\w+", text)) for subject in self.subjects.get(word, ()))


def _probes(records: list[EditRecord], kind: str, scope: set[str] | None = None,
            asked: EditedQuestions | None = None) -> list[LocalityProbe]:
    """The records' probes of one kind, less those in `scope` and those asking an edited question."""
    return [p for r in records for p in r.probes(kind)
            if (scope is None or p.prompt not in scope) and (asked is None or not asked.asks(p))]


def _base_map(editor: Any, probes: list[LocalityProbe], max_new: int) -> dict[str, str]:
    prompts = list(dict.fromkeys(p.prompt for p in probes))
    return dict(zip(prompts, _outputs(editor, prompts, max_new, base=True)))


def _probe_locality(editor: Any, probes: list[LocalityProbe], known: dict[str, str], max_new: int) -> float:
    """Fraction of probes whose output is the base model's; base outputs missing from `known` are made now."""
    if not probes:
        return math.nan
    base = {**known, **_base_map(editor, [p for p in probes if p.prompt not in known], max_new)}
    return metrics.locality(_outputs(editor, [p.prompt for p in probes], max_new), [base[p.prompt] for p in probes])


def _answer_ppl(editor: Any, probes: list[LocalityProbe], *, base: bool) -> float:
    answered = [EditRecord(prompt=p.prompt, target=p.answer) for p in probes if p.answer]
    return metrics.perplexity(_flat(editor.target_token_nlls(answered, base=base))) if answered else math.nan


def _record_mean(rows: list[list[bool]]) -> float:
    """Token accuracy as EasyEdit reports it: the share of each record's target tokens that are right,
    averaged over records (so a long target counts once, like a short one)."""
    rows = [row for row in rows if row]
    return sum(sum(row) / len(row) for row in rows) / len(rows) if rows else math.nan


def _token_locality(editor: Any, probes: list[LocalityProbe], answers: dict[str, str]) -> float:
    """EasyEdit's locality: teacher-forced on probe + answer, the share of answer positions where the
    edited model's argmax token is the pre-edit model's. A probe without a known answer is scored on the
    base model's own output for it (`answers`)."""
    rows = [EditRecord(prompt=p.prompt, target=p.answer or answers.get(p.prompt, "")) for p in probes]
    rows = [r for r in rows if r.target.strip()]
    if not rows:
        return math.nan
    edited, base = editor.target_token_argmax(rows), editor.target_token_argmax(rows, base=True)
    return _record_mean([[a == b for a, b in zip(e, o)] for e, o in zip(edited, base)])


def _target_budget(editor: Any, targets: list[str], max_new: int) -> int:
    """New tokens enough for the longest target: a target longer than `max_new` tokens (KnowEdit's
    timestamps take 21) could never count as reached otherwise."""
    tokenizer = getattr(getattr(editor, "backbone", None), "tokenizer", None)
    if tokenizer is None or not targets:
        return max_new
    return max(max_new, max(len(tokenizer(" " + t, add_special_tokens=False).input_ids) for t in targets) + 1)


def _success(editor: Any, prompts: list[str], targets: list[str], max_new: int) -> float:
    if not prompts:
        return math.nan
    return metrics.success_rate(_outputs(editor, prompts, _target_budget(editor, targets, max_new)), targets)


def superseded(records: list[EditRecord]) -> list[bool]:
    """Per record: whether the last record asking its question has another target. A question is a
    `question` label, or the very prompt: CounterFact edits one prompt under two true answers ("Chicago
    is a twin city of": Warsaw, Prague), which a label built from the true answer keeps apart."""
    def same_prompt(prompt: str) -> str:  # casefolded, runs of white space as one
        return " ".join(prompt.casefold().split())

    by_label: dict[str, str] = {}
    by_prompt: dict[str, str] = {}
    for record in records:
        if record.question:
            by_label[record.question] = record.target
        by_prompt[same_prompt(record.prompt)] = record.target
    return [(bool(r.question) and by_label[r.question] != r.target) or by_prompt[same_prompt(r.prompt)] != r.target
            for r in records]


def generality_split(editor: Any, records: list[EditRecord]) -> dict[str, float]:
    """Generality on each record's first rephrasing, split by why it falls short: the share of
    rephrasings routed to some block, and generality among those (the block's own share)."""
    rephrased = [r for r in records if r.rephrases]
    pairs = [(r.rephrases[0], r.target) for r in rephrased]
    outputs = editor.generate([p for p, _ in pairs])
    routed = [i for i, g in enumerate(outputs) if g.block is not None]
    latest = [i for i, s in enumerate(superseded(rephrased)) if not s]
    return {
        "generality": metrics.success_rate([g.output for g in outputs], [t for _, t in pairs]),
        "generality_latest": metrics.success_rate([outputs[i].output for i in latest], [pairs[i][1] for i in latest])
        if any(r.question for r in rephrased) else math.nan,
        "rephrases_routed": len(routed) / max(len(pairs), 1),
        "generality_when_routed": metrics.success_rate([outputs[i].output for i in routed], [pairs[i][1] for i in routed]),
    }


def measure(editor: Any, edited: list[EditRecord], nq: list[str], baseline: _Baseline, max_new: int, *,
            history: list[EditRecord] | None = None) -> dict[str, float]:
    """All metrics on the records `edited`, against the pre-edit outputs in `baseline`. `history`: every
    record applied so far, when `edited` is a sample of them; which probes are in some edit's scope and
    which edits a later one supersedes are decided on it."""
    history = edited if history is None else history
    targets = [r.target for r in edited]
    budget = _target_budget(editor, targets, max_new)
    outputs = _outputs(editor, [r.prompt for r in edited], budget)
    rephrased = [r for r in edited if r.rephrases]
    rephrase_outputs = _outputs(editor, [r.rephrases[0] for r in rephrased], budget)
    gone = {r.id for r, s in zip(history, superseded(history)) if s}
    latest = [i for i, r in enumerate(rephrased) if r.id not in gone]
    labelled = any(r.question for r in edited)
    hits = editor.target_token_hits(edited)
    rephrase_hits = editor.target_token_hits([EditRecord(prompt=r.rephrases[0], target=r.target) for r in rephrased])
    scope, asked = _edit_scope(history), EditedQuestions(history)
    neighbours, subject = _probes(edited, "neighbour", scope, asked), _probes(edited, "subject", scope, asked)
    nq_probes = _probes(edited, "nq", scope, asked)
    other_facts = neighbours + nq_probes  # ppl_locality: the answers of other subjects' facts
    aliases = [(a, r.target) for r in edited for a in r.alias_rephrases]
    portable = [p for r in edited for p in r.portability]
    unrelated = [LocalityProbe(q, kind="nq") for q in nq] + nq_probes
    return {
        "ppl_edited": metrics.perplexity(_flat(editor.target_token_nlls(edited))),
        "ppl_locality": _answer_ppl(editor, other_facts, base=False),
        "ppl_locality_base": _answer_ppl(editor, other_facts, base=True),
        "ppl_subject": _answer_ppl(editor, subject, base=False),
        "ppl_subject_base": _answer_ppl(editor, subject, base=True),
        "reliability": metrics.success_rate(outputs, targets),
        "reliability_f1": metrics.mean_token_f1(outputs, targets),
        "token_accuracy": _record_mean(hits),
        "generality_token_accuracy": _record_mean(rephrase_hits),
        "generality": metrics.success_rate(rephrase_outputs, [r.target for r in rephrased]) if rephrased else math.nan,
        "generality_f1": metrics.mean_token_f1(rephrase_outputs, [r.target for r in rephrased]) if rephrased else math.nan,
        "generality_latest": metrics.success_rate([rephrase_outputs[i] for i in latest], [rephrased[i].target for i in latest])
        if labelled and latest else math.nan,
        "superseded": sum(r.id in gone for r in edited) / len(edited) if labelled else math.nan,
        "generality_alias": _success(editor, [a for a, _ in aliases], [t for _, t in aliases], max_new),
        "portability": _success(editor, [p.prompt for p in portable], [p.answer for p in portable], max_new),
        "locality_nq": _probe_locality(editor, unrelated, {**baseline.nq_probes, **dict(zip(nq, baseline.nq))}, max_new),
        "locality_neighbours": _probe_locality(editor, neighbours, baseline.neighbours, max_new),
        "locality_subject": _probe_locality(editor, subject, baseline.subject, max_new),
        "locality_nq_token_accuracy": _token_locality(
            editor, unrelated, {**baseline.nq_probes, **dict(zip(nq, baseline.nq))}),
        "locality_neighbours_token_accuracy": _token_locality(editor, neighbours, baseline.neighbours),
        "locality_subject_token_accuracy": _token_locality(editor, subject, baseline.subject),
    }


HISTORY_KINDS = {"neighbour": "neighbours", "subject": "subject"}  # probe kind -> metric name


def history_locality(editor: Any, history: list[EditRecord], max_new: int, *, check: int = 256,
                     seed: int = 0) -> dict[str, float]:
    """Neighbour and same-subject locality over every probe of every edit in `history`, not a sample.

    A probe the index routes to no edit runs on the exact base model, bit for bit, so only the routed
    probes are generated, with and without the edits; the others count as kept. That rests on one
    property, so it is checked in the same run: `check` random probes of each kind are also generated
    both ways in mixed batches, as `measure` does, and `unrouted_changed` counts those routed nowhere
    whose output changed anyway (0 when the property holds)."""
    scope, asked = _edit_scope(history), EditedQuestions(history)
    rng = random.Random(seed)
    out: dict[str, float] = {"unrouted_checked": 0, "unrouted_changed": 0}
    for kind, name in HISTORY_KINDS.items():
        prompts = [p.prompt for p in _probes(history, kind, scope, asked)]
        unique = list(dict.fromkeys(prompts))
        step = editor.config.generate.batch_size * 16
        ids = [int(i) for start in range(0, len(unique), step) for i in editor.route(unique[start : start + step]).ids]
        routed = [p for p, i in zip(unique, ids) if i >= 0]
        log.info("history locality, %s probes: %d distinct, %d routed to an edit", kind, len(unique), len(routed))
        changed = {p for p, e, b in zip(routed, _outputs(editor, routed, max_new), _outputs(editor, routed, max_new, base=True))
                   if e != b}
        routed_set = set(routed)
        out[f"locality_{name}_all"] = 1 - sum(p in changed for p in prompts) / len(prompts) if prompts else math.nan
        out[f"{name}_probes_all"] = len(prompts)
        out[f"{name}_routed_all"] = sum(p in routed_set for p in prompts)
        sample = rng.sample(unique, min(check, len(unique)))
        edited, base = _outputs(editor, sample, max_new), _outputs(editor, sample, max_new, base=True)
        unrouted = [(e, b) for p, e, b in zip(sample, edited, base) if p not in routed_set]
        out["unrouted_checked"] += len(unrouted)
        out["unrouted_changed"] += sum(e != b for e, b in unrouted)
    return out


def base_outputs(editor: Any, records: list[EditRecord], nq: list[str], max_new: int) -> _Baseline:
    """Pre-edit outputs that locality is measured against."""
    return _Baseline(
        nq=_outputs(editor, nq, max_new, base=True),
        neighbours=_base_map(editor, _probes(records, "neighbour"), max_new),
        subject=_base_map(editor, _probes(records, "subject"), max_new),
        nq_probes=_base_map(editor, _probes(records, "nq"), max_new),
    )


def evaluate(editor: Any, records: list[EditRecord], nq: list[str], plan: EvalPlan, *, progress: bool = True) -> dict[str, Any]:
    """Run the protocol for one editor; returns final metrics, speed, size and the curve."""
    positions = plan.measured(records)
    sampled = [records[i] for i in positions]
    baseline = base_outputs(editor, sampled, nq, plan.max_new_tokens)

    def measure_now(edited: list[EditRecord]) -> dict[str, float]:
        chosen = [records[i] for i in positions if i < len(edited)]
        return {"measured_records": len(chosen),
                **measure(editor, chosen, nq, baseline, plan.max_new_tokens, history=edited)}

    edit_seconds = 0.0
    curve: list[dict[str, float]] = []
    edited: list[EditRecord] = []
    bar = tqdm(total=len(records), desc=f"{editor.name} edits", unit="edit", disable=not progress)
    next_mark = plan.every
    for start in range(0, len(records), plan.batch_size):
        batch = records[start : start + plan.batch_size]
        started = time.perf_counter()
        editor.edit(batch)
        edit_seconds += time.perf_counter() - started
        edited += batch
        bar.update(len(batch))
        if next_mark is not None and len(edited) >= next_mark and len(edited) < len(records):
            if positions and positions[0] < len(edited):  # a curve point needs a measured record applied
                curve.append({"edits": len(edited), **measure_now(edited)})
            next_mark += plan.every or 0
    bar.close()
    final = measure_now(edited)
    curve.append({"edits": len(edited), **final})
    stats = editor.stats()
    return {
        "editor": editor.name,
        "edits": len(edited),
        **final,
        "edits_per_min": len(edited) / edit_seconds * 60 if edit_seconds > 0 else math.nan,
        "edit_seconds": edit_seconds,
        "extra_parameters": int(stats.get("extra_parameters", 0)),
        # the process's peak so far: exact for one editor per process, an upper bound for the later ones
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "stats": stats,
        "curve": curve,
    }


def peak_rss_bytes() -> int:
    """The process's maximum resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the final metrics, one row per editor."""
    head = ["editor", "edits", *METRIC_NAMES, *PPL_NAMES, "edits/min", "peak RSS GB", "extra params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["editor"], str(row["edits"])]
        cells += ["-" if math.isnan(row[m]) else f"{row[m]:.3f}" for m in METRIC_NAMES]
        cells += ["-" if math.isnan(row[m]) else f"{row[m]:.2f}" for m in PPL_NAMES]
        peak = row.get("peak_rss_gb")  # absent in results written before it was measured
        cells += [f"{row['edits_per_min']:.1f}", "-" if peak is None else f"{peak:.2f}", f"{row['extra_parameters']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Metrics against the number of edits, one line per editor, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRIC_NAMES if any(not math.isnan(p[m]) for r in rows for p in r["curve"])]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for row in rows:
            xs = [p["edits"] for p in row["curve"]]
            ax.plot(xs, [p[metric] for p in row["curve"]], marker="o", label=row["editor"])
        ax.set_title(metric)
        ax.set_xlabel("edits")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RESULT_FILES = ("results.json", "results.md", "curves.png")  # what write_results leaves in its folder


def write_results(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data, table, curves = (out / name for name in RESULT_FILES)
    clean = json.loads(json.dumps({"meta": meta, "editors": rows}, default=float).replace("NaN", "null"))
    data.write_text(json.dumps(clean, indent=2))
    table.write_text(
        f"Lifelong editing, {meta.get('data')}, T = {meta.get('n_edits')}, batch {meta.get('batch_size')}"
        + (f"; quality measured on {meta['sample']} records drawn at random (seed {meta.get('sample_seed', 0)})"
           if meta.get("sample") and meta["sample"] < (meta.get("n_edits") or 0) else "") + "\n\n"
        + results_table(rows)
    )
    plot_curves(rows, curves)
