"""The cluster tree: Ward merges of planted leaves, nested levels, the flat-level rule, verbatim leaves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.curation.cluster import ClusterConfig, ClusterPipeline, verbatim_groups
from refusal_atlas.curation.cluster_tree import OUTLIER, build_tree, level_counts, renumber


def _planted_leaves() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two far-apart families (A, B), each of three nearby leaves; rows of each leaf scattered around it."""
    rng = np.random.default_rng(0)
    family_dirs = np.eye(16)[:2] * 4.0
    leaf_of, family_of, rows = [], [], []
    for fam in range(2):
        for sub in range(3):
            centre = family_dirs[fam] + rng.normal(scale=0.5, size=16)
            for _ in range(10 + 5 * sub):
                rows.append(centre + rng.normal(scale=0.05, size=16))
                leaf_of.append(3 * fam + sub)
                family_of.append(fam)
    return np.asarray(rows), np.asarray(leaf_of), np.asarray(family_of)


def test_ward_tree_merges_within_families_first():
    x, leaf, family = _planted_leaves()
    leaves = leaf.copy()
    leaves[::17] = OUTLIER  # a few outliers stay outliers at every level
    tree = build_tree(x, leaves)
    assert tree.n_leaves == 6 and tree.merges.shape == (5, 2)
    assert np.all(np.diff(tree.heights) >= -1e-9)  # Ward costs never decrease
    two = tree.cut(2)
    kept = leaves != OUTLIER
    assert adjusted_rand_score(family[kept], two[kept]) == 1.0
    assert adjusted_rand_score(leaf[kept], tree.cut(6)[kept]) == 1.0
    for k in range(1, 7):
        cut = tree.cut(k)
        assert (cut[~kept] == OUTLIER).all() and len(set(cut[kept].tolist())) == k
    # nested: every cluster of a finer cut lies inside one cluster of the coarser cut
    for coarse_k, fine_k in [(2, 3), (3, 4), (4, 6)]:
        coarse, fine = tree.cut(coarse_k), tree.cut(fine_k)
        for c in set(fine[kept].tolist()):
            assert len(set(coarse[fine == c].tolist())) == 1


def test_levels_are_spaced():
    assert level_counts(40) == [*range(2, 13), 13, 16, 19, 23, 28, 33, 40]
    assert level_counts(11) == list(range(2, 12))
    assert level_counts(40, every_up_to=2, ratio=2 ** 0.5) == [2, 4, 5, 7, 10, 14, 20, 28, 40]
    assert level_counts(2) == [2] and level_counts(1) == [1] and level_counts(0) == [0]
    assert list(renumber(np.array([5, 5, -1, 2, 2, 2]))) == [1, 1, -1, 0, 0, 0]


def test_identical_texts_become_leaves_of_their_own(tmp_path):
    """Each text repeated at least `verbatim_min` times is a leaf, however few rows it has."""
    from refusal_atlas.curation.embed import Embedder

    topics = ["weapons", "hacking", "self-harm", "fraud"]
    texts = [f"I'm sorry, but I can't help with that. I don't assist with {t}." for t in topics for _ in range(6)]
    texts += ["I'm sorry, but I can't help with that request."] * 20
    truth = [t for t in topics for _ in range(6)] + ["shared"] * 20
    assert len(verbatim_groups(texts, np.arange(len(texts)), 3)) == 5
    x = Embedder(cache_root=tmp_path).encode(texts)
    res = ClusterPipeline(ClusterConfig(min_cluster_size=3, layout_2d=False)).fit(x, texts)
    assert res.verbatim_leaves == 5 and res.tree is not None and res.tree.n_leaves == 5
    assert adjusted_rand_score(truth, res.levels[-1]) == 1.0
    assert res.level_counts[-1] == 5 and res.n_clusters == 5  # the shared reply alone is 45 %: one leaf


@pytest.mark.parametrize("n", [0, 1])
def test_tree_of_nothing_or_one_leaf(n):
    labels = np.full(5, OUTLIER) if n == 0 else np.zeros(5, dtype=int)
    tree = build_tree(np.eye(5), labels)
    assert tree.n_leaves == n and (tree.cut(3) == labels).all()
