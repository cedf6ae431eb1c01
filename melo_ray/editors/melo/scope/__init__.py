"""MELO's scope decision: which edit, if any, a prompt switches on. Read it top to bottom:

1. `views`, `encoder`, `relation`, `keys`: what a prompt looks like to the scope model (MiniLM keys of
   the prompt, its focus and its masked focus; hashed word and name views; the tuned relation view).
2. `verifier`: the scope model, a learned pair classifier shipped as `scope_verifier.safetensors` with
   the threshold calibrated for it. Its head is the pair MLP (over the views' vectors), the similarity
   ensemble (over each view's cosine only, which carries to relations it never saw) or the blend of the
   two; `cross_encoder` is the cross-encoder alternative, measured in docs/scope_validation.md and not
   wired in.
3. `policy`: every rule besides the model's logit, frozen and versioned, written whole into snapshots.
4. `decision`: the model and the policy applied to a query and the edits in reach, with the reason.
5. `index`: the cluster geometry (centres, radii, the HNSW graph) that decides which edits are in reach.

`training/` builds the pairs (public training splits and hand-written Wikidata templates), the splits
that hold whole relations out, and the trainers. Text helpers live below, in `melo_ray.text`.
"""
