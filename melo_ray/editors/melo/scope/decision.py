"""The scope decision: the verifier plus the policy, applied to one query against the edits in reach.

`ScopeTest` holds a verifier and the policy's query-time rules (threshold and namesake bar, ranking,
latest of a question); `decide` settles which edit, if any, serves a query, and says why
(`ScopeDecision`: the rule, the edit weighed, its score and its bar)."""
from __future__ import annotations

import numpy as np

from melo_ray.editors.melo.scope.policy import ScopePolicy
from melo_ray.editors.routing import ScopeDecision
from melo_ray.editors.melo.scope.verifier import ScopeVerifier


SAME_PROMPT_ATOL = 1e-5
NAMES_TIE = 1e-5  # names views are float32 unit vectors: equal bags agree to ~1e-7
NAMESAKE_COSINE = 0.5  # names trigram cosine below which a member never counts as naming what the query names


def _closest(names: np.ndarray) -> np.ndarray:
    """Which of the members' names cosines to a query are the highest, to the rounding tolerance."""
    return names >= names.max(initial=0.0) - NAMES_TIE


class ScopeTest:
    """The verifier plus its decision threshold, as the index applies it.

    Keys are the concatenated views the verifier names (`view_names`); the first view (the MiniLM key
    of the whole prompt) is the routing view the clusters and the HNSW graph use."""

    def __init__(self, verifier: ScopeVerifier, threshold: float, conflict_threshold: float | None = None,
                 latest_of_question: bool = True, prefer_same_names: bool = False, namesake_bar: float = 0.0,
                 closest_namesakes: bool = True, focus_reach: bool = False) -> None:
        self.verifier = verifier
        self.threshold = float(threshold)
        # None: only an identical prompt supersedes an earlier edit with another target
        self.conflict_threshold = conflict_threshold
        # a rewording goes to the latest edit of its question, not the member it resembles most
        self.latest_of_question = latest_of_question
        # among members that pass, those naming who the query names win ("Ferrari F40" over "Ferrari FXX")
        self.prefer_same_names = prefer_same_names and "names" in verifier.view_names
        if namesake_bar < 0:
            raise ValueError("scope namesake_bar must be >= 0")
        # the threshold rises by this much per e-fold of members naming what the query names (0: flat)
        self.namesake_bar = float(namesake_bar) if "names" in verifier.view_names else 0.0
        # k counts the members naming the query most closely; False: every one at NAMESAKE_COSINE or more
        # (snapshots written before the closest rule)
        self.closest_namesakes = closest_namesakes
        # a cluster also holds a query whose focus view (its last sentence) lies within its radius: a
        # rewording behind a long unrelated prefix is farther by the whole prompt than by its question
        self.focus_reach = focus_reach and "focus" in verifier.view_names
        if self.focus_reach and verifier.view_dims[verifier.view_names.index("focus")] != verifier.view_dims[0]:
            raise ValueError("scope focus_reach: the focus view must be as wide as the routing view")

    @classmethod
    def from_policy(cls, verifier: ScopeVerifier, policy: ScopePolicy) -> "ScopeTest":
        return cls(verifier, policy.threshold, policy.conflict_threshold, policy.latest_of_question,
                   policy.prefer_same_names, policy.namesake_bar, policy.closest_namesakes, policy.focus_reach)

    def policy(self, cluster_per_edit: bool) -> ScopePolicy:
        """The rules this test applies (as in effect: a rule its verifier cannot serve is off), plus the
        index's write-time rule, as one policy a snapshot carries whole."""
        return ScopePolicy(self.threshold, self.conflict_threshold, self.latest_of_question, self.prefer_same_names,
                           self.namesake_bar, self.closest_namesakes, self.focus_reach, cluster_per_edit)

    @property
    def key_dim(self) -> int:
        return self.verifier.key_dim

    @property
    def route_dim(self) -> int:
        return self.verifier.view_dims[0]

    @property
    def reach_starts(self) -> tuple[int, ...]:
        """Where each view that a cluster's radius is measured on starts in a key: the routing view, and
        with `focus_reach` the focus view (both MiniLM keys of a text, so both comparable to a centre)."""
        if not self.focus_reach:
            return (0,)
        return (0, sum(self.verifier.view_dims[: self.verifier.view_names.index("focus")]))

    def logits(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Logit per member that it asks what `query` asks; identical keys always pass (+inf)."""
        members = np.atleast_2d(members)
        out = self.verifier.logits(np.asarray(query)[None, :], members).astype(np.float64)
        # one prompt's keys differ by ~1e-7 between encoder batches (padding changes the float sums),
        # so "identical" allows a little more than that
        identical = np.all(np.abs(members - np.asarray(query)[None, :]) <= SAME_PROMPT_ATOL, axis=1)
        out[identical] = np.inf
        return out

    def names_to(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Names cosine of each member to `query`, computed once per routed query for the rules below
        that read it; all ones when neither rule is on (every member ties)."""
        members = np.atleast_2d(members)
        if not (self.prefer_same_names or self.namesake_bar):  # both set only with a names view
            return np.ones(members.shape[0])
        return self.verifier.names_cosine(np.asarray(query)[None, :], members)

    def bar(self, names: np.ndarray) -> float:
        """The logit a member must reach, given every member's `names_to` the query: the threshold,
        raised by `namesake_bar` x ln(k) for the k members that name what the query names. Each of them
        is one more chance for a question about their subject that none of them asks to pass by
        mistake; with a logistic tail, k chances at threshold + ln(k) err about as often as one at the
        threshold. The k are the members naming it most closely (and at least `NAMESAKE_COSINE`): one
        subject's edits share a names view, while "David Mellor" beside "David Yost" or "Windows 7"
        beside "Windows XP" is another subject, which the ranking rule puts behind the query's own."""
        if not self.namesake_bar:
            return self.threshold
        namesakes = names >= NAMESAKE_COSINE
        if self.closest_namesakes:
            namesakes &= _closest(names)
        return self.threshold + self.namesake_bar * float(np.log(max(int(namesakes.sum()), 1)))

    def closest_names(self, names: np.ndarray) -> np.ndarray:
        """Which members (given their `names_to` the query) name what it names most closely, to a
        rounding tolerance; all of them when the ranking rule is off."""
        if not self.prefer_same_names:
            return np.ones(len(names), bool)
        return _closest(names)

    def same_names(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Which members name exactly what `query` names (all of them when the ranking rule is off)."""
        if not self.prefer_same_names:
            return np.ones(np.atleast_2d(members).shape[0], bool)
        return self.names_to(query, members) >= 1.0 - NAMES_TIE

    def supersedes(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Which members an edit of `query` with another target replaces (conflict rule)."""
        limit = np.inf if self.conflict_threshold is None else self.conflict_threshold
        return self.logits(query, members) >= limit




def decide(scope: ScopeTest, key: np.ndarray, member_keys: np.ndarray, member_blocks: np.ndarray,
           member_ids: list[str]) -> tuple[int | None, ScopeDecision]:
    """Which of the members in reach serves `key` (its position; None: none), and why.

    The one the scope test scores highest, if it passes its bar (ties: the latest). A rewording (no member
    is the very prompt) goes to the latest edit of its question: among the members that pass, the latest
    one the scope test calls the same question as the best. So a question edited again in other words
    answers its newest target, while each edited wording still answers its own."""
    logits = scope.logits(key, member_keys)
    names = scope.names_to(key, member_keys)
    bar = scope.bar(names)

    def why(rule: str, at: int) -> ScopeDecision:
        return ScopeDecision(rule, member_ids[at], float(logits[at]), bar, len(member_ids))

    passing = np.flatnonzero(logits >= bar)
    if not passing.size:
        closest = int(np.argmax(logits))
        return None, why("names_gate" if np.isneginf(logits).all() else "below_bar", closest)
    ranked = passing
    if passing.size > 1 and np.isfinite(logits[passing]).all():  # the very prompt wins by its key
        ranked = passing[scope.closest_names(names[passing])]
    top = ranked[logits[ranked] == logits[ranked].max()]
    best = int(top[np.argmax(member_blocks[top])])
    rule = "identical_prompt" if np.isposinf(logits[best]) else (
        "scope_test" if logits[best] >= logits[passing].max() else "same_names_first")
    later = passing[member_blocks[passing] > member_blocks[best]]
    if scope.latest_of_question and np.isfinite(logits[best]) and later.size:
        same = later[scope.logits(member_keys[best], member_keys[later]) >= scope.threshold]
        if same.size:  # of those, the same subject asked again
            same = same[scope.same_names(member_keys[best], member_keys[same])]
        if same.size:
            best, rule = int(same[np.argmax(member_blocks[same])]), "latest_of_question"
    return best, why(rule, best)
