"""Describe clusters: c-TF-IDF keywords, representative texts and centroids (outliers excluded)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from refusal_atlas.curation.cluster_stages import OUTLIER

# --------------------------------------------------------------------------- keywords and examples


# contractions survive the token pattern (it keeps apostrophes) but carry no topic
_STOP_EXTRA = ["ll", "ve", "don", "just", "like", "make", "want", "need", "i'm", "can't", "don't", "i'd", "it's",
               "i'll", "won't", "you're", "that's", "let's", "isn't", "doesn't", "i've", "there's", "what's"]


def ctfidf_keywords(texts: Sequence[str], labels: np.ndarray, n_keywords: int = 10) -> dict[int, list[str]]:
    """Class-based TF-IDF: each cluster is one document; weight = tf(term, class) · log(1 + A / f(term)).

    A is the mean number of words per class and f the term's count over all classes, so words
    frequent everywhere (e.g. "sorry" in a refusal corpus) score low and distinctive ones high.
    """

    classes = sorted(set(labels.tolist()))
    docs = [" ".join(t for t, lab in zip(texts, labels, strict=True) if lab == c) for c in classes]
    try:
        vec = CountVectorizer(stop_words=sorted(ENGLISH_STOP_WORDS.union(_STOP_EXTRA)), ngram_range=(1, 2),
                              token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9'-]+\b", min_df=1)
        counts = vec.fit_transform(docs)
    except ValueError:  # empty vocabulary (texts are all stop words or symbols)
        return {c: [] for c in classes}
    counts = sp.csr_matrix(counts, dtype=np.float64)
    tf = sp.diags(1.0 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1)) @ counts
    term_freq = np.asarray(counts.sum(0)).ravel()
    avg_words = counts.sum() / len(classes)
    idf = np.log1p(avg_words / np.maximum(term_freq, 1))
    scores = (tf @ sp.diags(idf)).toarray()
    vocab = vec.get_feature_names_out()
    out: dict[int, list[str]] = {}
    for row, c in enumerate(classes):
        order = np.lexsort((vocab, -scores[row]))
        out[c] = [str(vocab[j]) for j in order[:n_keywords] if scores[row, j] > 0]
    return out


def cluster_name(keywords: Sequence[str], n: int = 3) -> str:
    """Up to `n` of the best keywords as a name, a phrase in place of its own words.

    c-TF-IDF ranks "nerve gas", "nerve" and "gas" side by side, in either order; "nerve gas / pipe bomb"
    reads better than "nerve / gas / pipe". A phrase replaces the chosen words it contains (keeping the
    place of the first); a word or phrase inside a chosen phrase is skipped; the first `n` that remain.
    """
    chosen: list[str] = []
    for phrase in keywords:
        words = phrase.split()
        if any(set(words) <= set(c.split()) for c in chosen):
            continue
        replaced = [i for i, c in enumerate(chosen) if len(c.split()) == 1 and c in words]
        if replaced:
            chosen[replaced[0]] = phrase
            chosen = [c for i, c in enumerate(chosen) if i not in replaced[1:]]
        else:
            chosen.append(phrase)
    return " / ".join(chosen[:n])


def representatives(x: np.ndarray, labels: np.ndarray, texts: Sequence[str], k: int = 5) -> dict[int, list[int]]:
    """Per cluster, the row indices of up to k distinct texts closest (cosine) to the cluster centroid."""
    out: dict[int, list[int]] = {}
    for c in sorted(set(labels.tolist()) - {OUTLIER}):
        members = np.flatnonzero(labels == c)
        centroid = x[members].mean(0)
        centroid /= np.linalg.norm(centroid) or 1.0
        sims = x[members] @ centroid
        chosen: list[int] = []
        seen: set[str] = set()
        for j in members[np.lexsort((members, -sims))]:
            if texts[j] not in seen:
                seen.add(texts[j])
                chosen.append(int(j))
            if len(chosen) == k:
                break
        out[c] = chosen
    return out


def centroids(x: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Unit-norm mean embedding of each cluster (outliers excluded)."""
    out = {}
    for c in sorted(set(labels.tolist()) - {OUTLIER}):
        v = x[labels == c].mean(0)
        out[c] = v / (np.linalg.norm(v) or 1.0)
    return out
