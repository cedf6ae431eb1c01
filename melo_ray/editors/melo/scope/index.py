"""The neuron index: clusters of keys that decide which LoRA block (or none) serves an input.

Training-time rules (d = distance to the nearest cluster centre C, R = its radius):
  d > R + R_init                   -> new cluster at the key with radius R_init
  d <= R + R_init, same label      -> member of C; C's radius grows to d if d > R
  d <= R + R_init, other label     -> conflict: C's radius shrinks to d/2, members of C now outside
                                      it are evicted (forgotten), new cluster at the key, radius d/2
Inference: nearest centre (HNSW, re-checked exactly); inside its radius -> the block of the nearest
member key; otherwise no block. Ties go to the newest cluster / member, so the latest edit wins.

With a scope test (scope.py) the key carries extra views and the rules ask it what the distance cannot
tell: at inference every candidate cluster whose radius holds the query offers its members, and the
member the verifier scores highest applies if it passes the threshold (else no block), except that a
rewording of a question edited again (in other words) goes to that question's latest edit (with
`prefer_same_names`, the members that pass and name what the query names most closely rank first, and
a rewording moves on only to a later edit naming exactly the same: "Ferrari F40" keeps to its own edit
when "Ferrari FXX" was edited with the same template; with `namesake_bar`, the threshold rises with the
number of members naming what the query names, each one more chance of a wrong pass; with
`focus_reach`, a cluster also holds a query whose focus view, its last sentence, lies within its
radius, so a rewording behind an unrelated sentence still reaches its edit); at training
time another label within reach forgets only the members it supersedes (the same prompt, or with
`scope_conflict_threshold` set, whatever the verifier scores at least that high), no radius shrinks,
and the new key starts its own cluster of radius R_init. Clusters then may overlap: the verifier, not the geometry, separates their facts.
With `cluster_per_edit` (a scope test only) a key with the nearest cluster's label starts its own cluster
too instead of joining it: a joined member's rewordings may lie outside the cluster's radius around the
first member's centre, and the verifier, not a shared target, decides which edit a query asks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import hnswlib
import numpy as np

from melo_ray.editors.melo.scope.decision import ScopeTest, decide
from melo_ray.editors.melo.scope.policy import ScopePolicy
from melo_ray.editors.routing import ScopeDecision, SearchResult
from melo_ray.text import normalise_label

log = logging.getLogger(__name__)

Metric = Literal["l2", "cosine"]
EventKind = Literal["added", "expanded", "member", "conflict", "separated"]


def distances(metric: Metric, query: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Exact distances from each query row to each point row: (q, n)."""
    query = np.atleast_2d(query).astype(np.float64)
    points = np.atleast_2d(points).astype(np.float64)
    if metric == "cosine":
        qn = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        pn = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
        return np.clip(1.0 - qn @ pn.T, 0.0, 2.0)
    if query.shape[0] * points.shape[0] * query.shape[1] <= 4_000_000:
        # Small sets: subtract directly, so identical keys give exactly 0 (the expansion would not).
        return np.linalg.norm(query[:, None, :] - points[None, :, :], axis=-1)
    sq = (query**2).sum(1)[:, None] + (points**2).sum(1)[None, :] - 2.0 * query @ points.T
    return np.sqrt(np.maximum(sq, 0.0))


@dataclass
class Cluster:
    centre: np.ndarray
    radius: float
    label: str
    member_keys: list[np.ndarray] = field(default_factory=list)
    member_blocks: list[int] = field(default_factory=list)
    member_ids: list[str] = field(default_factory=list)
    alive: bool = True


@dataclass(frozen=True)
class IndexEvent:
    kind: EventKind
    cluster: int
    distance: float | None
    forgotten: tuple[str, ...] = ()


class NeuronIndex:
    """Clusters of (key, block) members with an HNSW graph over cluster centres."""

    def __init__(
        self,
        dim: int,
        metric: Metric = "l2",
        r_init: float = 1.0,
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        candidates: int = 8,
        scope: ScopeTest | None = None,
        cluster_per_edit: bool = False,
    ) -> None:
        self.dim = dim
        self.scope = scope
        if scope is not None and scope.key_dim != dim:
            raise ValueError(f"scope test expects keys of {scope.key_dim} dims, the index {dim}")
        if cluster_per_edit and scope is None:
            raise ValueError("cluster_per_edit needs a scope test: without one, clusters are what separates facts")
        self.cluster_per_edit = cluster_per_edit
        # centres and the graph live in the routing view (the whole key without a scope test)
        self.route_dim = scope.route_dim if scope is not None else dim
        self.metric: Metric = metric
        self.r_init = float(r_init)
        self.candidates = candidates
        self.hnsw_params = dict(M=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        self.clusters: list[Cluster] = []
        self._alive = 0  # kept up to date so a search never walks every cluster
        self.conflicts = 0
        self.forgotten = 0
        self.separated = 0  # conflicts the scope test resolved without forgetting anything
        self._graph = self._new_graph(capacity=1024)
        # Centres never move once a cluster exists, so one growing matrix serves every exact re-check.
        self._centre_matrix = np.zeros((1024, self.route_dim), np.float32)

    # -- HNSW over centres ---------------------------------------------------------------------
    def _new_graph(self, capacity: int) -> hnswlib.Index:
        graph = hnswlib.Index(space="cosine" if self.metric == "cosine" else "l2", dim=self.route_dim)
        graph.init_index(
            max_elements=capacity,
            M=self.hnsw_params["M"],
            ef_construction=self.hnsw_params["ef_construction"],
            random_seed=100,
        )
        graph.set_ef(self.hnsw_params["ef_search"])
        graph.set_num_threads(1)  # single-threaded inserts keep the graph deterministic
        return graph

    def _graph_add(self, cluster_id: int, centre: np.ndarray) -> None:
        if cluster_id >= self._centre_matrix.shape[0]:
            grown = np.zeros((self._centre_matrix.shape[0] * 2, self.route_dim), np.float32)
            grown[: self._centre_matrix.shape[0]] = self._centre_matrix
            self._centre_matrix = grown
        self._centre_matrix[cluster_id] = centre
        if self._graph.element_count >= self._graph.max_elements:
            self._graph.resize_index(self._graph.max_elements * 2)
        self._graph.add_items(centre[None].astype(np.float32), np.array([cluster_id]))

    @property
    def num_alive(self) -> int:
        return self._alive

    @property
    def num_members(self) -> int:
        return sum(len(c.member_blocks) for c in self.clusters if c.alive)

    def _candidates(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest alive cluster per key: (cluster ids, exact distances); -1 / inf when empty."""
        n = keys.shape[0]
        if self.num_alive == 0:
            return np.full(n, -1, np.int64), np.full(n, np.inf)
        labels, dist = self._knn(keys)
        nearest = dist.min(axis=1)
        # equal distance -> the newest cluster (largest id), so a re-edited prompt's latest target wins
        best = np.where(dist == nearest[:, None], labels, -1).max(axis=1)
        return best, nearest

    def _knn(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `candidates` nearest alive clusters per routing key (n, k) and their exact distances."""
        keys = keys[:, : self.route_dim]
        k = min(self.candidates, self.num_alive)
        try:
            labels, _ = self._graph.knn_query(np.ascontiguousarray(keys, dtype=np.float32), k=k)
            labels = labels.astype(np.int64)
        except RuntimeError:  # HNSW could not return k alive items: search exactly instead
            ids = np.array([i for i, c in enumerate(self.clusters) if c.alive])
            order = np.argsort(distances(self.metric, keys, self._centres(ids)), axis=1)[:, :k]
            labels = ids[order]
        return labels, self._distances_to(keys, labels)  # (n, k) exact

    def _reach(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate clusters per key and their exact distances: the `candidates` nearest to each view a
        radius is measured on (the routing view; with the scope test's focus_reach also the focus
        view), side by side in one (n, k x views) pair of arrays."""
        first_labels, first_dist = labels, dist = self._knn(keys)
        for start in self.scope.reach_starts[1:] if self.scope is not None else ():
            view = keys[:, start : start + self.route_dim]
            # a one-sentence prompt is its own focus: its nearest clusters are the routing view's
            apart = np.flatnonzero((view != keys[:, : self.route_dim]).any(axis=1))
            if not apart.size:  # the usual query: no second search, no second column of candidates
                continue
            more, more_dist = first_labels.copy(), first_dist.copy()
            more[apart], more_dist[apart] = self._knn(np.ascontiguousarray(view[apart]))
            labels, dist = np.concatenate([labels, more], axis=1), np.concatenate([dist, more_dist], axis=1)
        return labels, dist

    def _distances_to(self, keys: np.ndarray, cluster_ids: np.ndarray) -> np.ndarray:
        """Exact distance from keys[i] to the centres of cluster_ids[i, j], without a loop over rows."""
        centres = self._centre_matrix[cluster_ids]  # (n, k, d)
        q = keys[:, : self.route_dim].astype(np.float64)[:, None, :]
        c = centres.astype(np.float64)
        if self.metric == "cosine":
            qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
            cn = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
            return np.clip(1.0 - (qn * cn).sum(-1), 0.0, 2.0)
        return np.linalg.norm(q - c, axis=-1)

    def _centres(self, ids: np.ndarray) -> np.ndarray:
        return self._centre_matrix[ids]

    # -- training-time rules -------------------------------------------------------------------
    def _new_cluster(self, key: np.ndarray, radius: float, label: str, block: int, edit_id: str) -> int:
        cluster = Cluster(centre=key[: self.route_dim].copy(), radius=radius, label=label)
        cluster.member_keys.append(key.copy())
        cluster.member_blocks.append(block)
        cluster.member_ids.append(edit_id)
        self.clusters.append(cluster)
        self._alive += 1
        cluster_id = len(self.clusters) - 1
        self._graph_add(cluster_id, cluster.centre)
        return cluster_id

    def add(self, key: np.ndarray, label: str, block: int, edit_id: str = "") -> IndexEvent:
        """Apply the add / expand / conflict rule for one key of a committed block."""
        key = np.asarray(key, dtype=np.float32).reshape(-1)
        if key.shape[0] != self.dim:
            raise ValueError(f"key has {key.shape[0]} dimensions, the index {self.dim}")
        if not np.all(np.isfinite(key)):
            raise ValueError("key has non-finite values")
        label = normalise_label(label)
        ids, dists = self._candidates(key[None])
        cid, d = int(ids[0]), float(dists[0])
        if cid < 0 or d > self.clusters[cid].radius + self.r_init:
            return IndexEvent("added", self._new_cluster(key, self.r_init, label, block, edit_id), None)
        cluster = self.clusters[cid]
        if cluster.label == label and not self.cluster_per_edit:
            kind: EventKind = "expanded" if d > cluster.radius else "member"
            cluster.radius = max(cluster.radius, d)
            cluster.member_keys.append(key.copy())
            cluster.member_blocks.append(block)
            cluster.member_ids.append(edit_id)
            return IndexEvent(kind, cid, d)
        if self.scope is not None:
            return self._scoped_conflict(key, label, block, edit_id)
        return self._conflict(cid, key, d, label, block, edit_id)

    def _scoped_conflict(self, key: np.ndarray, label: str, block: int, edit_id: str) -> IndexEvent:
        """Another label within reach: members (of any cluster within reach) that the scope test calls
        the same question with another label are superseded; the rest stay, radii unchanged."""
        assert self.scope is not None
        labels, dist = self._knn(key[None])
        forgotten: list[str] = []
        other_label = False
        for cid, d in zip(labels[0].tolist(), dist[0].tolist()):
            cluster = self.clusters[cid]
            if not cluster.alive or cluster.label == label or d > cluster.radius + self.r_init:
                continue
            other_label = True
            same = self.scope.supersedes(key, np.stack(cluster.member_keys))
            if not same.any():
                continue
            forgotten += [i for i, s in zip(cluster.member_ids, same) if s]
            cluster.member_keys = [m for m, s in zip(cluster.member_keys, same) if not s]
            cluster.member_blocks = [m for m, s in zip(cluster.member_blocks, same) if not s]
            cluster.member_ids = [m for m, s in zip(cluster.member_ids, same) if not s]
            if not cluster.member_keys:
                cluster.alive = False
                self._alive -= 1
                self._graph.mark_deleted(cid)
        new_id = self._new_cluster(key, self.r_init, label, block, edit_id)
        if not other_label:  # cluster_per_edit, and only clusters of this label within reach
            return IndexEvent("added", new_id, float(dist[0].min()))
        if not forgotten:
            self.separated += 1
            return IndexEvent("separated", new_id, float(dist[0].min()))
        self.conflicts += 1
        self.forgotten += len(forgotten)
        return IndexEvent("conflict", new_id, float(dist[0].min()), tuple(forgotten))

    def _conflict(self, cid: int, key: np.ndarray, d: float, label: str, block: int, edit_id: str) -> IndexEvent:
        cluster = self.clusters[cid]
        self.conflicts += 1
        cluster.radius = d / 2.0
        member_d = distances(self.metric, cluster.centre, np.stack(cluster.member_keys))[0]
        # d == 0: the new key sits on C's centre, so the new label supersedes the whole cluster.
        keep = member_d <= cluster.radius if d > 0 else np.zeros(len(member_d), bool)
        forgotten = tuple(i for i, k in zip(cluster.member_ids, keep) if not k)
        self._keep_members(cid, list(keep))
        self.forgotten += len(forgotten)
        new_id = self._new_cluster(key, d / 2.0, label, block, edit_id)
        return IndexEvent("conflict", new_id, d, forgotten)

    # -- inference ---------------------------------------------------------------------------
    def search(self, keys: np.ndarray) -> SearchResult:
        """Block per key: the nearest member's block inside the nearest cluster, else -1."""
        keys = np.atleast_2d(np.asarray(keys, dtype=np.float32))
        if keys.shape[0] == 0:  # an empty batch: nothing to route (the scoped path would index empty arrays)
            return SearchResult(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), ())
        if self.scope is not None:
            return self._scoped_search(keys)
        ids, dists = self._candidates(keys)
        blocks = np.full(keys.shape[0], -1, np.int64)
        edits: list[str | None] = [None] * keys.shape[0]
        radii = np.array([self.clusters[c].radius if c >= 0 else -1.0 for c in ids])
        inside = (ids >= 0) & (dists <= radii)
        # one pass per distinct cluster hit in this batch, not per row
        for cid in sorted(set(ids[inside].tolist())):  # a set beats np.unique for the usual 1-row query
            rows = np.nonzero(inside & (ids == cid))[0]
            cluster = self.clusters[cid]
            if len(cluster.member_blocks) == 1:  # the usual case: no member to choose between
                latest = np.zeros(len(rows), np.int64)
            else:
                md = distances(self.metric, keys[rows], np.stack(cluster.member_keys))  # (rows, members)
                nearest = md.min(axis=1, keepdims=True)
                latest = np.where(md == nearest, np.arange(md.shape[1])[None, :], -1).max(axis=1)  # ties: latest
            blocks[rows] = np.asarray(cluster.member_blocks)[latest]
            for row, member in zip(rows.tolist(), latest.tolist()):
                edits[row] = cluster.member_ids[member]
        decisions = tuple(ScopeDecision("inside_radius", e, None, None, 1) if e is not None
                          else ScopeDecision("out_of_reach") for e in edits)
        return SearchResult(block_ids=blocks, distances=dists, clusters=ids, edit_ids=tuple(edits), decisions=decisions)

    def within_reach(self, keys: np.ndarray) -> np.ndarray:
        """Per key, of which only the views reach is measured on need be filled in (the routing view, and
        the focus view with the scope test's focus_reach): whether any candidate cluster holds it. Keys
        out of reach route to no block whatever their other views say, so those need not be computed."""
        keys = np.atleast_2d(np.asarray(keys, dtype=np.float32))
        if self.num_alive == 0:
            return np.zeros(keys.shape[0], bool)
        labels, dist = self._reach(keys)
        radii = np.array([[self.clusters[c].radius for c in row] for row in labels.tolist()])
        return (dist <= radii).any(axis=1)

    def _scoped_search(self, keys: np.ndarray) -> SearchResult:
        """Every candidate cluster holding the query offers its members; the best-scored member that
        passes the scope test applies (ties: the latest), else no block."""
        assert self.scope is not None
        n = keys.shape[0]
        blocks = np.full(n, -1, np.int64)
        edits: list[str | None] = [None] * n
        decisions = [ScopeDecision("out_of_reach")] * n
        if self.num_alive == 0:
            return SearchResult(blocks, np.full(n, np.inf), np.full(n, -1, np.int64), tuple(edits), tuple(decisions))
        labels, dist = self._reach(keys)
        nearest = dist.min(axis=1)
        clusters = np.where(dist == nearest[:, None], labels, -1).max(axis=1)
        radii = np.array([[self.clusters[c].radius for c in row] for row in labels.tolist()])
        for row in np.nonzero((dist <= radii).any(axis=1))[0]:
            # a cluster both views reach offers its members once
            holding = dict.fromkeys(c for c, d, r in zip(labels[row].tolist(), dist[row], radii[row]) if d <= r)
            chosen, decisions[row] = self._scoped_member(keys[row], list(holding))
            if chosen is not None:
                cluster, member = chosen
                clusters[row], blocks[row] = cluster, self.clusters[cluster].member_blocks[member]
                edits[row] = self.clusters[cluster].member_ids[member]
        return SearchResult(block_ids=blocks, distances=nearest, clusters=clusters, edit_ids=tuple(edits),
                            decisions=tuple(decisions))

    def _scoped_member(self, key: np.ndarray, holding: list[int]) -> tuple[tuple[int, int] | None, ScopeDecision]:
        """(cluster, member position) of the member that serves `key` among the clusters holding it (None:
        no member), and why: the scope decision (decision.py) over every member of those clusters."""
        assert self.scope is not None
        owners = [(c, i) for c in holding for i in range(len(self.clusters[c].member_blocks))]
        chosen, why = decide(self.scope, key,
                             np.stack([self.clusters[c].member_keys[i] for c, i in owners]),
                             np.array([self.clusters[c].member_blocks[i] for c, i in owners]),
                             [self.clusters[c].member_ids[i] for c, i in owners])
        return (owners[chosen] if chosen is not None else None), why

    # -- lifecycle -----------------------------------------------------------------------------
    def remove_members(self, ids: set[str]) -> list[int]:
        """Drop the members with these edit ids; a cluster left without members dies. Centres and
        radii stay, so every other key is routed exactly as before. Returns the clusters that died."""
        died = []
        for cid, cluster in enumerate(self.clusters):
            if not cluster.alive or not ids.intersection(cluster.member_ids):
                continue
            if not self._keep_members(cid, [i not in ids for i in cluster.member_ids]):
                died.append(cid)
        return died

    def _keep_members(self, cid: int, keep: list[bool]) -> bool:
        """Keep the members of cluster `cid` where `keep` holds; a cluster left empty dies.
        Returns whether it is still alive."""
        cluster = self.clusters[cid]
        cluster.member_keys = [m for m, k in zip(cluster.member_keys, keep) if k]
        cluster.member_blocks = [m for m, k in zip(cluster.member_blocks, keep) if k]
        cluster.member_ids = [m for m, k in zip(cluster.member_ids, keep) if k]
        if not cluster.member_ids:
            cluster.alive = False
            self._alive -= 1
            self._graph.mark_deleted(cid)
        return cluster.alive

    def live_blocks(self) -> set[int]:
        return {b for c in self.clusters if c.alive for b in c.member_blocks}

    def renumber_blocks(self, mapping: dict[int, int]) -> None:
        """Give every live member its block's new number (compaction)."""
        for cluster in self.clusters:
            if cluster.alive:
                cluster.member_blocks = [mapping[b] for b in cluster.member_blocks]

    # -- snapshot ------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays (for safetensors) and metadata (for JSON) that restore this index exactly."""
        n = len(self.clusters)
        owners = [i for i, c in enumerate(self.clusters) for _ in c.member_blocks]
        arrays = {
            "centres": (np.stack([c.centre for c in self.clusters]) if n
                        else np.zeros((0, self.route_dim), np.float32)),
            "radii": np.array([c.radius for c in self.clusters], np.float64),
            "alive": np.array([c.alive for c in self.clusters], np.uint8),
            "member_keys": (
                np.stack([k for c in self.clusters for k in c.member_keys])
                if owners else np.zeros((0, self.dim), np.float32)
            ),
            "member_blocks": np.array([b for c in self.clusters for b in c.member_blocks], np.int64),
            "member_clusters": np.array(owners, np.int64),
        }
        meta = {
            "dim": self.dim,
            "metric": self.metric,
            "r_init": self.r_init,
            "candidates": self.candidates,
            "hnsw": self.hnsw_params,
            "labels": [c.label for c in self.clusters],
            "member_ids": [i for c in self.clusters for i in c.member_ids],
            "conflicts": self.conflicts,
            "forgotten": self.forgotten,
        }
        if self.scope is not None:  # written only with a scope test; the policy whole, every field
            meta.update(route_dim=self.route_dim, separated=self.separated,
                        scope_policy=self.scope.policy(self.cluster_per_edit).to_json())
        return arrays, meta

    def save_graph(self, path: Path) -> None:
        self._graph.save_index(str(path))

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, graph_path: Path | None = None,
                   scope: ScopeTest | None = None) -> "NeuronIndex":
        """Restore `state()`; `scope` must be given exactly when the state was written with one."""
        hnsw = meta["hnsw"]
        if ("route_dim" in meta) != (scope is not None):
            raise ValueError("index snapshot: written with" + ("" if "route_dim" in meta else "out")
                             + " a scope test, restored with" + ("" if scope is not None else "out"))
        index = cls(
            int(meta["dim"]), meta["metric"], float(meta["r_init"]), hnsw_m=hnsw["M"],
            ef_construction=hnsw["ef_construction"], ef_search=hnsw["ef_search"],
            candidates=int(meta["candidates"]), scope=scope,
            cluster_per_edit=scope is not None and ScopePolicy.from_index_meta(meta, "index snapshot").cluster_per_edit,
        )
        if scope is not None:
            if int(meta["route_dim"]) != index.route_dim:
                raise ValueError("index snapshot: routing view differs from the scope test's")
            index.separated = int(meta["separated"])
        labels, member_ids = meta["labels"], meta["member_ids"]
        n = len(labels)
        if not (arrays["centres"].shape[0] == arrays["radii"].shape[0] == arrays["alive"].shape[0] == n):
            raise ValueError("index snapshot: cluster arrays and labels disagree in length")
        if not (arrays["member_keys"].shape[0] == arrays["member_blocks"].shape[0]
                == arrays["member_clusters"].shape[0] == len(member_ids)):
            raise ValueError("index snapshot: member arrays disagree in length")
        for i in range(n):
            index.clusters.append(Cluster(
                centre=arrays["centres"][i].astype(np.float32), radius=float(arrays["radii"][i]),
                label=labels[i], alive=bool(arrays["alive"][i]),
            ))
        for key, block, owner, edit_id in zip(
            arrays["member_keys"], arrays["member_blocks"], arrays["member_clusters"], member_ids
        ):
            cluster = index.clusters[int(owner)]
            cluster.member_keys.append(key.astype(np.float32))
            cluster.member_blocks.append(int(block))
            cluster.member_ids.append(edit_id)
        index.conflicts, index.forgotten = int(meta["conflicts"]), int(meta["forgotten"])
        index._alive = sum(c.alive for c in index.clusters)
        index._centre_matrix = np.zeros((max(1024, n), index.route_dim), np.float32)
        index._centre_matrix[:n] = arrays["centres"]
        if graph_path is not None and n:
            index._graph = hnswlib.Index(space="cosine" if index.metric == "cosine" else "l2", dim=index.route_dim)
            index._graph.load_index(str(graph_path), max_elements=max(1024, n))
            index._graph.set_ef(hnsw["ef_search"])
            index._graph.set_num_threads(1)
            if index._graph.element_count != n:
                raise ValueError(f"index snapshot: graph holds {index._graph.element_count} centres, expected {n}")
        else:  # rebuild from centres in id order
            for i, cluster in enumerate(index.clusters):
                index._graph_add(i, cluster.centre)
                if not cluster.alive:
                    index._graph.mark_deleted(i)
        return index
