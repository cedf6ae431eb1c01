"""The serving engine without Ray: mixed batches, per-request lengths, stop strings, swaps."""
from __future__ import annotations

import pytest

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.serving.engine import CompletionRequest, ServingEngine
from melo_ray.snapshots import SnapshotError
from melo_ray.store import SnapshotStore


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    store = SnapshotStore(tmp_path_factory.mktemp("store"))
    editor = MeloEditor(tiny_config())
    editor.edit(fact_records(0, 10))
    editor.publish(store)
    return store, editor


def test_a_mixed_batch_matches_the_editor_and_shorter_requests_are_prefixes(published):
    store, editor = published
    engine = ServingEngine.from_snapshot(*store.read())
    records = fact_records(0, 3)
    prompts = [records[0]["prompt"], UNRELATED[0], records[2]["prompt"]]
    out = engine.complete([CompletionRequest(p, 8) for p in prompts])
    expected = editor.generate(prompts, 8)
    assert [o.text.strip() for o in out] == [g.output for g in expected]
    assert [o.block for o in out] == [g.block for g in expected] and out[1].block is None
    assert all(o.version == 1 for o in out)
    mixed = engine.complete([CompletionRequest(UNRELATED[0], 3), CompletionRequest(UNRELATED[0], 8)])
    assert mixed[0].completion_tokens == 3 and mixed[0].finish_reason == "length"
    assert out[1].text.startswith(mixed[0].text)


def test_stop_strings_cut_the_text(published):
    store, _ = published
    engine = ServingEngine.from_snapshot(*store.read())
    record = fact_records(0, 1)[0]
    full = engine.complete([CompletionRequest(record["prompt"], 8)])[0].text
    cut = engine.complete([CompletionRequest(record["prompt"], 8, stop=(full.strip()[2:4],))])[0]
    assert cut.finish_reason == "stop" and full.startswith(cut.text) and len(cut.text) < len(full)


def test_install_refuses_a_snapshot_of_another_base_model(published, tmp_path):
    store, _ = published
    engine = ServingEngine.from_snapshot(*store.read())
    manifest, files = store.read()
    with pytest.raises(SnapshotError, match="other base weights"):
        engine.install({**manifest, "base_checksum": "0" * 64}, files)
    assert engine.version == 1  # still serving what it had


# -- the decode loop: continuous batching, sampling, chat ---------------------------------------
def test_continuous_batching_equals_greedy_generate_and_drops_finished_rows():
    from melo_ray.editors.melo.editor import MeloEditor
    from melo_ray.inference import generate_token_ids
    from melo_ray.serving.decoding import DecodeLoop, Sequence

    editor = MeloEditor(tiny_config())
    editor.edit(fact_records(0, 10))
    prompts = [r["prompt"] for r in fact_records(0, 10)] + UNRELATED
    routing = editor.routing(prompts)
    backbone = editor.backbone
    budgets = [3 + (i * 5) % 11 for i in range(len(prompts))]  # rows of different lengths
    seqs = [Sequence(backbone.tokenize(backbone.format_prompt(p))["input_ids"], n, routing.take([i]))
            for i, (p, n) in enumerate(zip(prompts, budgets))]
    loop = DecodeLoop(editor, max_batch=4)
    waiting, widths = list(seqs), []
    while waiting or loop.rows:  # rows join between steps as others finish
        take = loop.free
        if waiting and take:
            loop.admit(waiting[:take])
            waiting = waiting[take:]
        widths.append(len(loop.rows))
        loop.step()
    with editor.routed(routing):
        reference = generate_token_ids(backbone, prompts, max(budgets))
    for seq, ref, budget in zip(seqs, reference, budgets):
        assert seq.tokens == ref[:budget] and seq.finish_reason in ("length", "stop")
    assert max(widths) <= 4 and loop.rows == [] and loop.cache is None  # finished rows left the batch


def test_sampling_is_seeded_per_request_and_never_moves_the_routing(published):
    from melo_ray.serving.decoding import SamplingParams

    engine = ServingEngine.from_snapshot(*published[0].read())
    prompt = fact_records(0, 10)[2]["prompt"]
    hot = SamplingParams(temperature=1.5, top_p=0.9, seed=7)
    first = engine.complete([CompletionRequest(prompt, 12, sampling=hot), CompletionRequest(UNRELATED[0], 12, sampling=hot)])
    again = engine.complete([CompletionRequest(prompt, 12, sampling=hot)])
    assert first[0].text == again[0].text  # the same seed, the same text, whatever else is in the batch
    other = engine.complete([CompletionRequest(prompt, 12, sampling=SamplingParams(1.5, 0.9, seed=8))])
    greedy = engine.complete([CompletionRequest(prompt, 12)])
    assert {first[0].block, other[0].block, greedy[0].block} == {0} and first[1].block is None


def test_chat_routes_on_the_last_user_message_whatever_the_system_prompt(published):
    engine = ServingEngine.from_snapshot(*published[0].read())
    record = fact_records(0, 10)[4]
    outputs = []
    for system in ("You are terse.", "Answer in French, and think about zzzz qqqq first."):
        model_input = engine.chat_input([{"role": "system", "content": system}, {"role": "user", "content": record["prompt"]}])
        assert record["prompt"] in model_input and system in model_input
        outputs.append(engine.complete([CompletionRequest(record["prompt"], 6, model_input=model_input)])[0])
    assert [(o.block, o.edit_id) for o in outputs] == [(0, "f4"), (0, "f4")]


def test_edits_trained_in_chat_format_hold_through_the_chat_template():
    """train.formats [raw, chat]: one block learns each edit both ways; a chat client gets the target."""
    from melo_ray.editors.melo.editor import MeloEditor

    records = fact_records(0, 6)
    editor = MeloEditor(tiny_config(train={"formats": ["raw", "chat"]}))
    editor.edit(records)
    editor.backbone.prompt_view = "chat"  # how a chat client asks: a user turn of the template
    chat = [g.output for g in editor.generate([r["prompt"] for r in records], 6)]
    editor.backbone.prompt_view = "raw"
    raw = [g.output for g in editor.generate([r["prompt"] for r in records], 6)]
    assert sum(o.startswith(r["target"]) for o, r in zip(chat, records)) >= 5
    assert sum(o.startswith(r["target"]) for o, r in zip(raw, records)) >= 5


def test_the_batcher_wakes_a_non_streaming_caller_once_and_a_streaming_one_per_piece(published):
    import threading

    from melo_ray.serving.batcher import Batcher

    store, _ = published
    batcher = Batcher(ServingEngine.from_snapshot(*store.read()), max_batch=4)
    updates: dict[str, list] = {"stream": [], "whole": []}
    done = {name: threading.Event() for name in updates}

    def collect(name):
        def on_update(update):
            updates[name].append(update)
            if update.completion is not None or update.error is not None:
                done[name].set()
        return on_update

    try:
        for name in updates:
            batcher.submit(CompletionRequest(UNRELATED[0], 8, min_new_tokens=8), collect(name), stream=name == "stream")
        assert all(event.wait(60) for event in done.values())
    finally:
        batcher.stop()
    assert len(updates["whole"]) == 1 and updates["whole"][0].completion.completion_tokens == 8
    assert len(updates["stream"]) > 1
    assert "".join(u.delta for u in updates["stream"]) == updates["whole"][0].completion.text
