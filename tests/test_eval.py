"""The evaluation harness end to end on a tiny model, and the two baselines."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import CONFIGS, UNRELATED, fact_records, fresh_mlflow_db, tiny_config
from melo_ray.editors.grace.editor import GraceEditor
from melo_ray.editors.lora.editor import SequentialLoraEditor
from melo_ray.evaluation import EvalPlan, base_outputs, evaluate, history_locality, measure, results_table, superseded
from melo_ray.metrics import success_rate
from melo_ray.records import EditRecord, LocalityProbe, PortabilityProbe


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli_writes_results_for_every_editor(tmp_path, capsys, mlflow_db_template):
    from melo_ray.cli.main import main

    mlflow_uri = fresh_mlflow_db(mlflow_db_template, tmp_path / "mlflow.db")  # the schema made once per run

    records = [{**r, "rephrases": [r["prompt"].replace("Where", "where")], "locality_prompt": UNRELATED[i % 3],
                "locality_answer": "Nothing"}
               for i, r in enumerate(fact_records(0, 20))]
    edits = _jsonl(tmp_path / "edits.jsonl", records)
    nq = _jsonl(tmp_path / "nq.jsonl", [{"question": q, "answer": ["x"]} for q in UNRELATED])
    code = main(["eval", "--config", str(CONFIGS / "tiny-llama.yaml"), "--edits", str(edits), "--n-edits", "20",
                 "--editors", "melo,lora", "--batch-size", "10", "--every", "10", "--locality", str(nq),
                 "--out", str(tmp_path / "out"), "--quiet", "--mlflow-experiment", "peers",
                 "--mlflow-uri", mlflow_uri])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    by_name = {r["editor"]: r for r in results["editors"]}
    assert set(by_name) == {"melo", "lora"}
    melo, lora = by_name["melo"], by_name["lora"]
    assert melo["reliability"] == 1.0 and melo["locality_nq"] == 1.0 and melo["token_accuracy"] == 1.0
    # sequential fine-tuning forgets the first batch and moves unrelated outputs; MELO does neither
    assert lora["reliability"] < melo["reliability"] and lora["locality_nq"] < 1.0
    assert [p["edits"] for p in melo["curve"]] == [10, 20]
    # edited targets become likely; MELO leaves the locality answers' perplexity exactly as the base model's
    assert melo["ppl_edited"] < 1.5 and melo["ppl_locality"] == melo["ppl_locality_base"]
    assert lora["ppl_locality"] != lora["ppl_locality_base"]
    assert melo["edits_per_min"] > 0 and melo["extra_parameters"] > 0
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    assert "| melo | 20 |" in (tmp_path / "out" / "results.md").read_text()
    assert "| melo | 20 |" in capsys.readouterr().out
    assert 0 < melo["peak_rss_gb"] < 64
    # the same rows in MLflow: one child run per editor with its metrics, its own config section and the curve
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("peers").experiment_id])
    children = {r.data.params["editor"]: r for r in runs if "editor" in r.data.params}
    assert set(children) == {"melo", "lora"} and len(runs) == 3
    logged = children["melo"].data
    assert logged.metrics["reliability"] == melo["reliability"] and logged.metrics["locality_nq"] == melo["locality_nq"]
    assert "locality_subject" not in logged.metrics  # no such probes in this data: not logged as 0
    parent = next(r for r in runs if "editor" not in r.data.params)
    assert parent.data.params["config.lora.block_rank"] == "4" and parent.data.params["eval.n_edits"] == "20"
    # the results files beside the database, not in whatever folder the command ran from
    logged_files = {p.name for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
    assert logged_files == {"results.json", "results.md", "curves.png"}
    # a folder written earlier logs the same way from the command line
    assert main(["eval-log", str(tmp_path / "out"), "--experiment", "later",
                 "--mlflow-uri", mlflow_uri]) == 0
    assert len(client.search_runs([client.get_experiment_by_name("later").experiment_id])) == 3
    assert [m.step for m in client.get_metric_history(children["melo"].info.run_id, "reliability")] == [10, 20]


class _SubjectLeakingEditor:
    """Stands in for an editor whose key is dominated by the subject: besides its own prompt, an edit fires
    on every prompt that names its subject, whatever the relation. Answers' likelihood drops (NLL 3
    instead of 1) wherever the output moved."""

    name = "leaky"

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}  # edited prompt -> target
        self.facts: dict[str, str] = {}  # subject -> latest target

    def edit(self, batch: list[EditRecord]) -> None:
        self.targets.update({r.prompt: r.target for r in batch})
        self.facts.update({r.subject: r.target for r in batch})

    def _output(self, prompt: str, base: bool) -> str:
        if base:
            return f"(base answer to {prompt})"
        leaked = [t for s, t in self.facts.items() if s in prompt]
        return self.targets.get(prompt) or (leaked[-1] if leaked else self._output(prompt, True))

    def generate(self, prompts, max_new=16, *, base=False):
        return [SimpleNamespace(output=self._output(p, base)) for p in prompts]

    def target_token_hits(self, records, *, base=False):
        return [[self._output(r.prompt, base).startswith(r.target)] for r in records]

    def target_token_argmax(self, records, *, base=False):  # one "token": the whole output
        return [[self._output(r.prompt, base)] for r in records]

    def target_token_nlls(self, records, *, base=False):
        return [[1.0 if self._output(r.prompt, base) == self._output(r.prompt, True) else 3.0] for r in records]

    def stats(self):
        return {"extra_parameters": 0}


def test_locality_is_measured_apart_for_each_kind_of_probe():
    records = [
        EditRecord(prompt="The gender of Tom Ash is", target="female", subject="Tom Ash",
                   alias_rephrases=("The gender of Tom Ash, the luger, is", "The gender of T. Ash is"),
                   portability=(PortabilityProbe("Tom Ash identifies as", "female"),),
                   locality=(LocalityProbe("The place of birth of Tom Ash is", "Cesis", "subject"),  # leaks
                             LocalityProbe("The birth name of T. Ash is", None, "subject"),  # alias: stays
                             LocalityProbe("The gender of Kim Poe is", "male", "neighbour"),
                             LocalityProbe("who wrote hamlet", "Shakespeare", "nq"))),
        EditRecord(prompt="The occupation of Lee Orr is", target="luger", subject="Lee Orr",
                   locality=(LocalityProbe("The place of birth of Lee Orr is", "Riga", "subject"),  # leaks
                             # another edit below changes this prompt on purpose: not a locality probe then
                             LocalityProbe("The employer of Lee Orr is", "NASA", "subject"),
                             LocalityProbe("what did Lee Orr win in 1999", None, "nq"))),  # leaks
        EditRecord(prompt="The employer of Lee Orr is", target="IBM", subject="Lee Orr"),
    ]
    nq = ["who is the king of spain"]
    editor = _SubjectLeakingEditor()
    result = evaluate(editor, records, nq, EvalPlan(batch_size=1), progress=False)
    assert result["reliability"] == 1.0 and math.isnan(result["generality"])
    assert result["locality_subject"] == pytest.approx(1 / 3)  # 2 of 3 same-subject probes moved
    assert result["locality_neighbours"] == 1.0
    assert result["locality_nq"] == pytest.approx(2 / 3)  # the NQ list and the records' own "nq" probes pooled
    # the toolkit's teacher-forced locality sees the same leaks (argmax tokens against the base model's)
    assert result["locality_subject_token_accuracy"] == pytest.approx(1 / 3)
    assert result["locality_neighbours_token_accuracy"] == 1.0
    assert result["locality_nq_token_accuracy"] == pytest.approx(2 / 3)
    assert result["ppl_subject"] == pytest.approx(math.exp(3.0)) and result["ppl_subject_base"] == pytest.approx(math.e)
    assert result["ppl_locality"] == result["ppl_locality_base"] == pytest.approx(math.e)  # Kim Poe, hamlet
    assert result["generality_alias"] == 0.5 and result["portability"] == 1.0
    # a baseline made without the records (pipelines/scalability.py) gets the probes' base outputs on demand
    assert measure(editor, records, nq, base_outputs(editor, [], nq, 16), 16)["locality_subject"] == pytest.approx(1 / 3)
    header = results_table([result]).splitlines()[0]
    assert "locality_subject" in header and "ppl_subject_base" in header and "generality_alias" in header


def test_an_edit_a_later_one_re_asks_is_scored_apart():
    records = [
        EditRecord(prompt="Who was the mother of Kyrre?", target="Babur", rephrases=("Kyrre's mother is",), question="q1", subject="@1"),
        EditRecord(prompt="Which lady bore Kyrre?", target="Boris", rephrases=("Kyrre was born to",), question="q1", subject="@2"),
        EditRecord(prompt="Who wrote GODI?", target="Ada", rephrases=("GODI's author is",), question="q2", subject="@3"),
    ]
    assert superseded(records) == [True, False, False]
    # the very prompt edited again counts too, whatever the labels say (CounterFact's one prompt, two true answers)
    again = EditRecord(prompt="who wrote  GODI?", target="Bo", rephrases=("GODI was written by",), question="q3", subject="@4")
    assert superseded(records + [again]) == [True, False, True, False]
    editor = _SubjectLeakingEditor()  # rephrasings stay on the base model: generality 0 everywhere
    editor.targets["Kyrre was born to"] = "Boris"  # the latest target of q1 for the later wording
    result = evaluate(editor, records, [], EvalPlan(batch_size=3), progress=False)
    assert result["superseded"] == pytest.approx(1 / 3)
    assert result["generality"] == pytest.approx(1 / 3) and result["generality_latest"] == 0.5
    unlabelled = [EditRecord(prompt=r.prompt, target=r.target, rephrases=r.rephrases, subject=r.subject) for r in records]
    plain = evaluate(_SubjectLeakingEditor(), unlabelled, [], EvalPlan(batch_size=3), progress=False)
    assert math.isnan(plain["superseded"]) and math.isnan(plain["generality_latest"])


def test_a_probe_asking_an_edited_question_is_no_locality_probe_and_history_decides_it():
    # CounterFact: a neighbour prompt names another subject with the same true answer; once that subject's
    # fact is edited too, the neighbour asks the edited question in other words
    ada = EditRecord(prompt="The mother tongue of Ada Poe is", target="English", subject="Ada Poe",
                     question="ada poe | french", rephrases=("Ada Poe speaks",),
                     locality=(LocalityProbe("Bob Kay is a native speaker of", "French", "neighbour"),
                               LocalityProbe("Ann Lee is a native speaker of", "French", "neighbour")))
    bob = EditRecord(prompt="The mother tongue of Bob Kay is", target="Dutch", subject="Bob Kay",
                     question="bob kay | french", rephrases=("Bob Kay speaks",))
    ann = EditRecord(prompt="The religion of Ann Lee is", target="Islam", subject="Ann Lee",
                     question="ann lee | christianity")  # another question of Ann Lee: her probe still counts
    editor = _SubjectLeakingEditor()  # every prompt naming an edited subject moves
    result = evaluate(editor, [ada, bob, ann], [], EvalPlan(batch_size=3), progress=False)
    assert result["locality_neighbours"] == 0.0  # only Ann Lee's probe is counted, and it leaked
    relabelled = [EditRecord(**{**r.to_dict(), "question": None}) for r in (ada, bob, ann)]
    assert evaluate(_SubjectLeakingEditor(), relabelled, [], EvalPlan(batch_size=3), progress=False)[
        "locality_neighbours"] == 0.0  # without labels both probes count, both leaked
    # measured on a sample: the history, not the sample, says which questions are edited and superseded
    later = EditRecord(prompt="Ada Poe's mother tongue is", target="Latin", subject="Ada Poe", question="ada poe | french")
    history = [ada, bob, later]
    editor = _SubjectLeakingEditor()
    editor.edit(history)  # Ann Lee is not edited here: her probe keeps its base answer
    baseline = base_outputs(editor, [ada], [], 16)
    on_sample = measure(editor, [ada], [], baseline, 16)
    on_history = measure(editor, [ada], [], baseline, 16, history=history)
    assert on_sample["superseded"] == 0.0 and on_history["superseded"] == 1.0
    assert on_sample["generality_latest"] == 0.0 and math.isnan(on_history["generality_latest"])
    assert on_sample["locality_neighbours"] == 0.5  # Bob Kay's probe counted, and it moved
    assert on_history["locality_neighbours"] == 1.0  # Bob Kay's edit asks it: left out


def test_quality_on_a_sample_applies_every_edit_and_asks_only_the_sample():
    # a scaling run (T = 5000) measures a seeded sample of the records; every record is still edited
    records = [EditRecord(prompt=f"Who founded firm {i}?", target=f"Founder {i}", subject=f"firm {i}",
                          rephrases=(f"Firm {i} was founded by",), question=f"firm {i} founder",
                          locality=(LocalityProbe(f"Where is firm {i} based?", "Oslo", "subject"),))
               for i in range(12)]
    plan = EvalPlan(batch_size=4, sample=3, sample_seed=7, every=4)
    chosen = plan.measured(records)  # depends on T and the seed only, never on the records' text
    assert chosen == sorted(chosen) and len(set(chosen)) == 3
    assert chosen != EvalPlan(batch_size=4, sample=3, sample_seed=8).measured(records)  # the seed decides
    # a record outside the sample, applied later, re-asks a sampled record's question with another target:
    # only the history, never the sample, knows that sampled edit is superseded
    later = max(i for i in range(12) if i not in chosen)
    asked_again = records[chosen[0]]
    assert later > chosen[0]
    records[later] = EditRecord(prompt=f"Who set up {asked_again.subject}?", target="Someone Else",
                                subject=asked_again.subject, question=asked_again.question)
    asked: list[str] = []

    class Recording(_SubjectLeakingEditor):
        def generate(self, prompts, max_new=16, *, base=False):
            asked.extend(prompts)
            return super().generate(prompts, max_new, base=base)

    editor = Recording()
    result = evaluate(editor, records, [], plan, progress=False)
    assert len(editor.targets) == 12 and result["edits"] == 12 and result["measured_records"] == 3
    edited_prompts = {r.prompt for r in records}
    assert {p for p in asked if p in edited_prompts} == {records[i].prompt for i in chosen}  # the rest never asked
    assert len({p for p in asked if p.startswith("Where")}) == 3  # only the sample's probes
    assert result["superseded"] == pytest.approx(1 / 3)  # decided on the history
    assert result["reliability"] == 1.0
    # curve points say how many sampled records they measured; none is taken before the first is applied
    measured_at = {p["edits"]: p["measured_records"] for p in result["curve"]}
    assert measured_at[12] == 3
    assert all(n == sum(i < edits for i in chosen) and n >= 1 for edits, n in measured_at.items())
    assert EvalPlan(batch_size=5, sample=50).measured(records) == list(range(12))  # more than T: all
    with pytest.raises(ValueError, match="sample"):
        EvalPlan(batch_size=5, sample=0)


def test_sequential_lora_forgets_and_its_base_mode_is_exact():
    editor = SequentialLoraEditor(tiny_config("tiny-llama"))
    base = [g.output for g in editor.generate(UNRELATED, base=True)]
    first = fact_records(0, 10)
    editor.edit(first)
    assert success_rate([g.output for g in editor.generate([r["prompt"] for r in first])], [r["target"] for r in first]) == 1.0
    editor.edit(fact_records(10, 10, "Name the {w} keeper."))
    assert success_rate([g.output for g in editor.generate([r["prompt"] for r in first])], [r["target"] for r in first]) < 0.5
    assert [g.output for g in editor.generate(UNRELATED, base=True)] == base


def _grace_with_keys(monkeypatch, keys: dict[str, list[float]]) -> GraceEditor:
    editor = GraceEditor(tiny_config("tiny-llama", grace={"eps_init": 1.0, "num_iter": 1}))
    dim = editor.layer.in_features

    def fake_keys(prompts):
        return torch.tensor([keys[p] + [0.0] * (dim - len(keys[p])) for p in prompts]).numpy()

    monkeypatch.setattr(editor.keys, "keys", fake_keys)
    return editor


def test_grace_codebook_adds_expands_and_splits(monkeypatch):
    editor = _grace_with_keys(monkeypatch, {"a": [0.0], "b": [1.5], "c": [2.2], "far": [9.0]})
    editor.edit([{"prompt": "a", "target": "X"}])
    editor.edit([{"prompt": "b", "target": "X"}])  # same label within eps_init + eps: expand
    assert editor.layer.eps.tolist() == [1.5] and len(editor.layer.labels) == 1
    editor.edit([{"prompt": "c", "target": "Y"}])  # another label within range: split
    assert editor.layer.eps.tolist() == pytest.approx([1.1, 1.1]) and editor.splits == 1
    editor.edit([{"prompt": "far", "target": "Z"}])  # out of range: new entry of radius eps_init
    assert editor.layer.eps.tolist() == pytest.approx([1.1, 1.1, 1.0])
    assert editor.route(["a", "c", "far"]).ids.tolist() == [0, 1, 2]


def test_grace_training_paraphrases_join_the_codebook_with_the_edits_value(monkeypatch):
    editor = _grace_with_keys(monkeypatch, {"a": [0.0], "a near": [0.5], "a far": [5.0], "far": [9.0]})
    editor.edit([{"prompt": "a", "target": "X", "train_rephrases": ["a near", "a far"]}])
    assert editor.layer.eps.tolist() == [1.0, 1.0] and len(editor.layer.labels) == 2  # "a near" lies inside entry 0
    torch.testing.assert_close(editor.layer.values[1], editor.layer.values[0])  # the far wording copies the value
    assert editor.route(["a near", "a far", "far"]).ids.tolist() == [0, 1, -1]
    assert editor.entry_edits[0] == editor.entry_edits[1] and len(editor.entry_edits[0]) == 1


def test_grace_leaves_inputs_outside_every_entry_bit_identical():
    editor = GraceEditor(tiny_config("tiny-llama", grace={"num_iter": 5}))
    before = editor.backbone.model(**editor.backbone.tokenizer(UNRELATED, return_tensors="pt", padding=True)).logits
    editor.edit(fact_records(0, 3))
    assert (editor.route(UNRELATED).ids == -1).all()
    generations = editor.generate(UNRELATED)
    assert [g.output for g in generations] == [g.output for g in editor.generate(UNRELATED, base=True)]
    after = editor.backbone.model(**editor.backbone.tokenizer(UNRELATED, return_tensors="pt", padding=True)).logits
    assert torch.equal(before, after)


def test_generality_split_tells_routing_misses_from_block_misses():
    from melo_ray.evaluation import generality_split

    answers = {"Where is A?": ("Oslo", 0), "Where is B?": ("Rome", 1), "Where is C?": ("Lima", None)}

    class Stub:
        def generate(self, prompts):
            return [SimpleNamespace(output=answers[p][0], block=answers[p][1]) for p in prompts]

    records = [EditRecord(prompt="a", target="Oslo", rephrases=("Where is A?",)),  # routed, right
               EditRecord(prompt="b", target="Paris", rephrases=("Where is B?",)),  # routed, wrong block answer
               EditRecord(prompt="c", target="Lima", rephrases=("Where is C?",)),  # base model happens to know
               EditRecord(prompt="d", target="Bonn")]  # no rephrasing: not counted
    split = generality_split(Stub(), records)
    assert math.isnan(split.pop("generality_latest"))  # no question labels
    assert split == {"generality": pytest.approx(2 / 3), "rephrases_routed": pytest.approx(2 / 3),
                     "generality_when_routed": 0.5}
    relabelled = [EditRecord(prompt=r.prompt, target=r.target, rephrases=r.rephrases, question=q)
                  for r, q in zip(records, ["q1", "q2", "q1", None])]  # a's question asked again by c
    assert generality_split(Stub(), relabelled)["generality_latest"] == 0.5  # b wrong, c right


class _RoutingLeakingEditor(_SubjectLeakingEditor):
    """The leaking editor with an index: a prompt naming an edited subject is routed (block 0), others
    run on the base model. `hide_routes`: the index says "none" everywhere while outputs still move."""

    config = SimpleNamespace(generate=SimpleNamespace(batch_size=2))

    def __init__(self, hide_routes: bool = False) -> None:
        super().__init__()
        self.hide_routes = hide_routes
        self.generated: list[str] = []

    def route(self, prompts):
        ids = [-1 if self.hide_routes or self._output(p, False) == self._output(p, True) else 0 for p in prompts]
        return SimpleNamespace(ids=np.array(ids))

    def generate(self, prompts, max_new=16, *, base=False):
        self.generated += prompts
        return super().generate(prompts, max_new, base=base)


def _history_records() -> list[EditRecord]:
    probes = [LocalityProbe(f"The {r} of {s} is", "x", "subject") for s in ("Lee Orr", "Kim Poe") for r in ("sport", "spouse")]
    return [
        EditRecord(prompt="The occupation of Lee Orr is", target="luger", subject="Lee Orr", locality=tuple(probes[:2])),
        EditRecord(prompt="The occupation of Ann Lu is", target="poet", subject="Ann Lu",
                   locality=(*probes[2:], LocalityProbe("Ann Lu's sister plays", "golf", "neighbour"),
                             LocalityProbe("Bo Ek plays", "golf", "neighbour"))),
    ]


def test_locality_over_the_whole_history_generates_only_routed_probes_and_checks_the_rest():
    records = _history_records()
    editor = _RoutingLeakingEditor()
    editor.edit(records)
    result = history_locality(editor, records, 16, check=100)
    full = measure(editor, records, [], base_outputs(editor, records, [], 16), 16)
    # Lee Orr's two probes leak, Kim Poe's do not; one neighbour names Ann Lu and leaks
    assert result["locality_subject_all"] == full["locality_subject"] == 0.5
    assert result["locality_neighbours_all"] == full["locality_neighbours"] == 0.5
    assert (result["subject_probes_all"], result["subject_routed_all"]) == (4, 2)
    assert result["unrouted_checked"] == 3 and result["unrouted_changed"] == 0
    editor.generated.clear()
    history_locality(editor, records, 16, check=0)
    assert sorted(set(editor.generated)) == ["Ann Lu's sister plays", "The sport of Lee Orr is", "The spouse of Lee Orr is"]

    hiding = _RoutingLeakingEditor(hide_routes=True)
    hiding.edit(records)
    caught = history_locality(hiding, records, 16, check=100)
    assert caught["locality_subject_all"] == 1.0  # the shortcut alone would miss the leaks ...
    assert caught["unrouted_changed"] == 3  # ... and the check reports them
