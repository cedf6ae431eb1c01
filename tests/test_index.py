"""Neuron index rules with hand-placed keys: add, member, expand, conflict, eviction, latest wins."""
from __future__ import annotations

import numpy as np
import pytest

from melo_ray.editors.melo.scope.index import NeuronIndex, distances


def _key(*xs: float) -> np.ndarray:
    return np.array(xs + (0.0,) * (4 - len(xs)), dtype=np.float32)


def test_far_key_adds_a_new_cluster_of_radius_r_init():
    index = NeuronIndex(4, "l2", r_init=1.0)
    assert index.add(_key(0), "Paris", 0).kind == "added"
    event = index.add(_key(5), "Rome", 0)  # 5 > R (1) + R_init (1)
    assert event.kind == "added" and index.num_alive == 2
    assert index.clusters[1].radius == 1.0


def test_same_label_inside_radius_is_a_member_and_just_outside_expands():
    index = NeuronIndex(4, "l2", r_init=1.0)
    index.add(_key(0), "Paris", 0, "a")
    member = index.add(_key(0.5), "Paris", 1, "b")
    assert member.kind == "member" and index.clusters[0].radius == 1.0
    expanded = index.add(_key(1.5), "Paris", 2, "c")
    assert expanded.kind == "expanded" and index.clusters[0].radius == pytest.approx(1.5)
    assert index.num_alive == 1 and index.num_members == 3


def test_conflict_shrinks_both_radii_to_half_and_evicts_members_outside():
    index = NeuronIndex(4, "l2", r_init=1.0)
    index.add(_key(0), "Paris", 0, "a")
    index.add(_key(-0.9), "Paris", 0, "far-member")  # 0.9 from the centre
    index.add(_key(0.2), "Paris", 0, "near-member")
    event = index.add(_key(1.6), "Rome", 1, "new")  # different label within R + R_init
    assert event.kind == "conflict" and event.forgotten == ("far-member",)
    assert index.clusters[0].radius == pytest.approx(0.8) and index.clusters[1].radius == pytest.approx(0.8)
    assert index.conflicts == 1 and index.forgotten == 1
    assert index.clusters[0].member_ids == ["a", "near-member"]


def test_conflict_inside_the_radius_is_a_conflict_too():
    index = NeuronIndex(4, "l2", r_init=1.0)
    index.add(_key(0), "Paris", 0)
    event = index.add(_key(0.4), "Rome", 1)
    assert event.kind == "conflict"
    assert index.clusters[0].radius == pytest.approx(0.2)
    result = index.search(np.stack([_key(0.05), _key(0.38), _key(3.0)]))
    assert result.block_ids.tolist() == [0, 1, -1]


def test_labels_are_compared_exactly_after_normalisation():
    index = NeuronIndex(4, "l2", r_init=1.0)
    index.add(_key(0), "New  York", 0)
    assert index.add(_key(0.1), "New York", 1).kind == "member"  # white space only
    assert index.add(_key(0.2), "new york", 2).kind == "conflict"  # case differs: another label


def test_same_prompt_edited_again_the_latest_target_wins():
    index = NeuronIndex(4, "l2", r_init=1.0)
    index.add(_key(1), "Paris", 0, "old")
    event = index.add(_key(1), "Rome", 3, "new")
    assert event.kind == "conflict" and event.forgotten == ("old",)
    assert index.search(_key(1)[None]).block_ids.tolist() == [3]


def test_search_uses_the_nearest_member_block_inside_the_cluster():
    index = NeuronIndex(4, "l2", r_init=2.0)
    index.add(_key(0), "Paris", 0)
    index.add(_key(1.0), "Paris", 7)  # same label, a later block
    result = index.search(np.stack([_key(0.1), _key(0.9), _key(10)]))
    assert result.block_ids.tolist() == [0, 7, -1]
    assert result.distances[2] == pytest.approx(10.0)


def test_empty_index_routes_everything_to_the_base_model():
    result = NeuronIndex(4).search(np.zeros((3, 4), np.float32))
    assert result.block_ids.tolist() == [-1, -1, -1] and np.all(np.isinf(result.distances))


def test_state_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    index = NeuronIndex(8, "l2", r_init=1.5)
    for i, key in enumerate(rng.normal(size=(200, 8)).astype(np.float32)):
        index.add(key, f"label{i % 7}", i // 20, f"e{i}")
    arrays, meta = index.state()
    index.save_graph(tmp_path / "g.hnsw")
    restored = NeuronIndex.from_state(arrays, meta, tmp_path / "g.hnsw")
    queries = rng.normal(size=(300, 8)).astype(np.float32)
    a, b = index.search(queries), restored.search(queries)
    assert np.array_equal(a.block_ids, b.block_ids) and np.array_equal(a.distances, b.distances)
    assert restored.conflicts == index.conflicts and restored.forgotten == index.forgotten


def test_hnsw_nearest_centre_matches_exact_search():
    rng = np.random.default_rng(1)
    index = NeuronIndex(16, "l2", r_init=0.01)  # tiny radius: every key its own cluster
    keys = rng.normal(size=(3000, 16)).astype(np.float32)
    for i, key in enumerate(keys):
        index.add(key, str(i), 0)
    queries = keys[:500] + rng.normal(scale=0.05, size=(500, 16)).astype(np.float32)
    found = index.search(queries).clusters
    exact = distances("l2", queries, keys).argmin(1)
    assert (found == exact).mean() >= 0.99


def test_cosine_metric():
    index = NeuronIndex(2, "cosine", r_init=0.1)
    index.add(np.array([1.0, 0.0], np.float32), "x", 0)
    result = index.search(np.array([[2.0, 0.1], [0.0, 1.0]], np.float32))
    assert result.block_ids.tolist() == [0, -1]


def test_bad_keys_are_rejected():
    index = NeuronIndex(4)
    with pytest.raises(ValueError, match="dimensions"):
        index.add(np.zeros(3, np.float32), "x", 0)
    with pytest.raises(ValueError, match="non-finite"):
        index.add(np.array([np.nan, 0, 0, 0], np.float32), "x", 0)
    assert index.num_alive == 0
