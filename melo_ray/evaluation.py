"""Lifelong-editing protocol: T edits arrive in order, in batches; metrics are taken on the final
state (and, optionally, every K edits for curves). Every editor is measured the same way."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from melo_ray import metrics
from melo_ray.records import EditRecord

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "reliability", "reliability_f1", "token_accuracy", "generality", "generality_f1",
    "locality_nq", "locality_neighbours",
)
# Perplexities (WikiBio hallucination protocol): of the edited targets given their prompts, and of
# each record's locality answer given its locality prompt, after editing and on the base model.
PPL_NAMES = ("ppl_edited", "ppl_locality", "ppl_locality_base")


@dataclass(frozen=True)
class EvalPlan:
    batch_size: int
    every: int | None = None  # measure every K edits as well as at the end
    max_new_tokens: int = 16


@dataclass(frozen=True)
class _Baseline:
    nq: list[str]
    neighbours: list[str]


def _outputs(editor: Any, prompts: list[str], max_new: int, *, base: bool = False) -> list[str]:
    return [g.output for g in editor.generate(prompts, max_new, base=base)] if prompts else []


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _neighbour_prompts(records: list[EditRecord]) -> list[str]:
    return [r.locality_prompt for r in records if r.locality_prompt]


def measure(editor: Any, edited: list[EditRecord], nq: list[str], baseline: _Baseline, max_new: int) -> dict[str, float]:
    """All metrics on the records edited so far, against the pre-edit outputs in `baseline`."""
    targets = [r.target for r in edited]
    outputs = _outputs(editor, [r.prompt for r in edited], max_new)
    rephrased = [r for r in edited if r.rephrases]
    rephrase_outputs = _outputs(editor, [r.rephrases[0] for r in rephrased], max_new)
    hits = [h for row in editor.target_token_hits(edited) for h in row]
    neighbours = _neighbour_prompts(edited)
    answered = [EditRecord(prompt=r.locality_prompt, target=r.locality_answer)
                for r in edited if r.locality_prompt and r.locality_answer]
    return {
        "ppl_edited": metrics.perplexity(_flat(editor.target_token_nlls(edited))),
        "ppl_locality": metrics.perplexity(_flat(editor.target_token_nlls(answered))) if answered else math.nan,
        "ppl_locality_base": (
            metrics.perplexity(_flat(editor.target_token_nlls(answered, base=True))) if answered else math.nan
        ),
        "reliability": metrics.success_rate(outputs, targets),
        "reliability_f1": metrics.mean_token_f1(outputs, targets),
        "token_accuracy": metrics.token_accuracy(hits),
        "generality": metrics.success_rate(rephrase_outputs, [r.target for r in rephrased]) if rephrased else math.nan,
        "generality_f1": metrics.mean_token_f1(rephrase_outputs, [r.target for r in rephrased]) if rephrased else math.nan,
        "locality_nq": metrics.locality(_outputs(editor, nq, max_new), baseline.nq) if nq else math.nan,
        "locality_neighbours": (
            metrics.locality(_outputs(editor, neighbours, max_new), baseline.neighbours[: len(neighbours)])
            if neighbours else math.nan
        ),
    }


def base_outputs(editor: Any, records: list[EditRecord], nq: list[str], max_new: int) -> _Baseline:
    """Pre-edit outputs that locality is measured against."""
    return _Baseline(
        nq=_outputs(editor, nq, max_new, base=True),
        neighbours=_outputs(editor, _neighbour_prompts(records), max_new, base=True),
    )


def evaluate(editor: Any, records: list[EditRecord], nq: list[str], plan: EvalPlan, *, progress: bool = True) -> dict[str, Any]:
    """Run the protocol for one editor; returns final metrics, speed, size and the curve."""
    baseline = base_outputs(editor, records, nq, plan.max_new_tokens)
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
            curve.append({"edits": len(edited), **measure(editor, edited, nq, baseline, plan.max_new_tokens)})
            next_mark += plan.every or 0
    bar.close()
    final = measure(editor, edited, nq, baseline, plan.max_new_tokens)
    curve.append({"edits": len(edited), **final})
    stats = editor.stats()
    return {
        "editor": editor.name,
        "edits": len(edited),
        **final,
        "edits_per_min": len(edited) / edit_seconds * 60 if edit_seconds > 0 else math.nan,
        "edit_seconds": edit_seconds,
        "extra_parameters": int(stats.get("extra_parameters", 0)),
        "stats": stats,
        "curve": curve,
    }


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the final metrics, one row per editor."""
    head = ["editor", "edits", *METRIC_NAMES, *PPL_NAMES, "edits/min", "extra params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["editor"], str(row["edits"])]
        cells += ["-" if math.isnan(row[m]) else f"{row[m]:.3f}" for m in METRIC_NAMES]
        cells += ["-" if math.isnan(row[m]) else f"{row[m]:.2f}" for m in PPL_NAMES]
        cells += [f"{row['edits_per_min']:.1f}", f"{row['extra_parameters']:,}"]
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


def write_results(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps({"meta": meta, "editors": rows}, default=float).replace("NaN", "null"))
    (out / "results.json").write_text(json.dumps(clean, indent=2))
    (out / "results.md").write_text(
        f"Lifelong editing, {meta.get('data')}, T = {meta.get('n_edits')}, batch {meta.get('batch_size')}\n\n"
        + results_table(rows)
    )
    plot_curves(rows, out / "curves.png")
