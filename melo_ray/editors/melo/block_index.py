"""MELO's index as an EditIndex: the neuron index of prompt keys -> LoRA blocks, with its snapshot
files. It holds no model, so the bulk-edit job runs it in its own actor (the single writer)."""
from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from melo_ray.config import EditorConfig
from melo_ray.editors.melo.scope.index import NeuronIndex
from melo_ray.editors.melo.config import IndexConfig
from melo_ray.editors.melo.scope.decision import ScopeTest
from melo_ray.editors.melo.scope.verifier import ScopeVerifier, load_verifier
from melo_ray.editors.melo.scope.policy import ScopePolicy
from melo_ray.editors.messages import IndexUpdate, StaleStateError, TrainedBatch
from melo_ray.editors.single_writer import EditIndex
from melo_ray.editors.routing import SearchResult
from melo_ray.snapshots import SnapshotError

SCOPE_FILE = "scope.safetensors"


def snapshot_verifier(files: Mapping[str, bytes], where: str) -> ScopeVerifier | None:
    """The scope verifier a snapshot's index was written with (None: no scope test)."""
    if SCOPE_FILE not in files:
        return None
    try:
        return ScopeVerifier.from_bytes(files[SCOPE_FILE])
    except ValueError as exc:
        raise SnapshotError(f"{where}: {SCOPE_FILE} is malformed ({exc})") from exc


def snapshot_key_dim(files: Mapping[str, bytes], where: str, default: int) -> int:
    """The width of the keys a snapshot's index holds: its own verifier's views, so a store written with
    another verifier than the config's still opens (its queries are keyed the way it was written)."""
    verifier = snapshot_verifier(files, where)
    return default if verifier is None else verifier.key_dim


def policy_from_config(cfg: IndexConfig, verifier: ScopeVerifier) -> ScopePolicy:
    """The config's scope policy; its threshold, unless the config sets one, the one calibrated into the
    verifier file (so it is never copied by hand)."""
    threshold = cfg.scope_threshold if cfg.scope_threshold is not None else verifier.calibrated_threshold
    if threshold is None:
        raise ValueError(f"index.scope_threshold: the verifier '{cfg.scope_verifier}' carries no calibrated "
                         "threshold, so the config must set one")
    return ScopePolicy(threshold, cfg.scope_conflict_threshold, cfg.scope_latest_of_question,
                       cfg.scope_prefer_same_names, cfg.scope_namesake_bar, True, cfg.scope_focus_reach,
                       cfg.scope_cluster_per_edit)


class BlockIndex(EditIndex):
    """The neuron index plus how many blocks it has indexed (blocks arrive in order, each once)."""

    def __init__(self, index: NeuronIndex, blocks_indexed: int = 0) -> None:
        self.index = index
        self.blocks_indexed = blocks_indexed

    @classmethod
    def create(cls, config: EditorConfig, dim: int) -> "BlockIndex":
        cfg = config.section("index")
        scope = None
        if cfg.scope_verifier is not None:
            verifier = load_verifier(cfg.scope_verifier)
            scope = ScopeTest.from_policy(verifier, policy_from_config(cfg, verifier))
        return cls(NeuronIndex(
            dim, cfg.distance, cfg.r_init, hnsw_m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction,
            ef_search=cfg.hnsw_ef_search, candidates=cfg.candidates, scope=scope,
            cluster_per_edit=scope is not None and cfg.scope_cluster_per_edit,
        ))

    @classmethod
    def from_files(cls, config: EditorConfig, dim: int, files: Mapping[str, bytes], where: str) -> "BlockIndex":
        try:
            arrays = safetensors.numpy.load(files["index.safetensors"])
            meta = json.loads(files["index.json"])
            graph_bytes = files["index.hnsw"]
            if int(meta["dim"]) != dim:
                raise SnapshotError(f"{where}: index keys have {meta['dim']} dims, the key function {dim}")
            scope = None
            verifier = config.section("index").scope_verifier
            if (verifier is not None) != ("route_dim" in meta):
                raise SnapshotError(f"{where}: the index was written with" + ("" if "route_dim" in meta else "out")
                                    + " a scope test; this config has " + ("one" if verifier else "none"))
            if "route_dim" in meta:  # the snapshot's own verifier and policy: it routes as it did
                scope = ScopeTest.from_policy(ScopeVerifier.from_bytes(files[SCOPE_FILE]),
                                              ScopePolicy.from_index_meta(meta, where))
            with tempfile.TemporaryDirectory() as tmp:
                graph = Path(tmp) / "index.hnsw"
                graph.write_bytes(graph_bytes)
                index = NeuronIndex.from_state(arrays, meta, graph, scope)
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{where}: index files are incomplete or malformed ({exc})") from exc
        if "blocks_indexed" in meta:
            return cls(index, int(meta["blocks_indexed"]))
        # snapshots written before the count was stored: the newest block with a member
        return cls(index, max((b for c in index.clusters for b in c.member_blocks), default=-1) + 1)

    def add(self, trained: TrainedBatch) -> IndexUpdate:
        if trained.block != self.blocks_indexed:
            raise StaleStateError(f"index has {self.blocks_indexed} blocks indexed, got block {trained.block}")
        forgotten: list[str] = []
        blocks = trained.edit_blocks()
        for key, target, edit_id, block in zip(np.asarray(trained.keys), trained.targets, trained.ids, blocks, strict=True):
            forgotten.extend(self.index.add(key, target, block, edit_id).forgotten)
        # each training paraphrase: one more member of its edit, so its wording routes to the edit's block
        for key, edit in zip(np.asarray(trained.extra_keys), trained.extra_key_edits, strict=True):
            forgotten.extend(self.index.add(key, trained.targets[edit], blocks[edit], trained.ids[edit]).forgotten)
        self.blocks_indexed += trained.block_count
        return IndexUpdate(clusters=self.index.num_alive, members=self.index.num_members,
                           conflicts=self.index.conflicts, forgotten=tuple(forgotten),
                           forgotten_total=self.index.forgotten)

    def search(self, keys: np.ndarray) -> SearchResult:
        return self.index.search(np.asarray(keys, dtype=np.float32))

    def files(self) -> dict[str, bytes]:
        arrays, meta = self.index.state()
        meta = {**meta, "blocks_indexed": self.blocks_indexed}
        with tempfile.TemporaryDirectory() as tmp:
            graph = Path(tmp) / "index.hnsw"
            self.index.save_graph(graph)
            graph_bytes = graph.read_bytes()
        files = {
            "index.safetensors": safetensors.numpy.save(arrays),
            "index.json": json.dumps(meta, sort_keys=True).encode(),
            "index.hnsw": graph_bytes,
        }
        if self.index.scope is not None:
            files[SCOPE_FILE] = self.index.scope.verifier.to_bytes()
        return files

    def stats(self) -> dict[str, int]:
        return {"clusters": self.index.num_alive, "members": self.index.num_members,
                "conflicts": self.index.conflicts, "forgotten": self.index.forgotten,
                "separated": self.index.separated}
