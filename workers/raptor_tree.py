"""RAPTOR: recursive abstractive processing for tree-organised retrieval.

RAPTOR indexes a document at several granularities: chunks are embedded and
clustered, each cluster is summarised, and the summaries are embedded,
clustered and summarised again until one root remains. Retrieval can then
match a broad question against a summary instead of hoping one chunk covers
it.

By default everything here is offline and deterministic, so a retried task
rebuilds exactly the same tree and tests need no network or model weights:

* embeddings are signed feature-hashing vectors of word unigrams and bigrams;
* clustering is a Gaussian mixture over a PCA projection, with the number of
  clusters chosen by BIC as RAGFlow does (PCA stands in for RAGFlow's UMAP,
  which is neither deterministic nor a light dependency);
* summaries are extractive: sentences close to the cluster centroid, taken
  in turn from different members, within the chunk token budget.

The tree is shaped the way RAPTOR intends: no summary has a single child (a
cluster of one is carried up instead), clustering goes on until one root is
left, and chunks without text (a table of contents, a page number) stay out.

Setting ``JOBQ_EMBED_URL`` and/or ``JOBQ_LLM_URL`` switches embeddings and/or
summaries to any OpenAI-compatible server (``/embeddings`` and
``/chat/completions``), with model names from ``JOBQ_EMBED_MODEL`` and
``JOBQ_LLM_MODEL`` and optional bearer tokens from ``JOBQ_EMBED_API_KEY`` and
``JOBQ_LLM_API_KEY``. A server that answers 429 (or 503 with ``Retry-After``)
snoozes the task for what it asks (``jobqueue.raise_for_backpressure``)
instead of spending one of its retries.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sklearn.decomposition import PCA  # type: ignore[import-untyped]
from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
from sklearn.mixture import GaussianMixture  # type: ignore[import-untyped]

from jobqueue import raise_for_backpressure

from .chunking import count_tokens

__all__ = [
    "EMBED_DIM",
    "Node",
    "RaptorError",
    "build_tree",
    "cluster",
    "embed",
    "fit_budget",
    "has_text",
    "split_sentences",
    "summarise",
]

Vectors = npt.NDArray[np.float64]
# A node of the tree as (level, index): level 0 indexes the input chunks.
Ref = tuple[int, int]

EMBED_DIM: Final = 512
DEFAULT_MAX_CLUSTER_SIZE: Final = 10
DEFAULT_MAX_SENTENCES: Final = 6
# A summary is retrieved like a chunk, so it gets the chunker's default budget.
DEFAULT_MAX_TOKENS: Final = 256
# Only a safety bound: every level leaves fewer nodes to cluster, and in
# practice a few hundred pages take five or six levels to reach the root.
DEFAULT_MAX_LEVELS: Final = 24
_MIN_SUMMARY_WORDS: Final = 6
# Below this share of letters among the visible characters a chunk is dotted
# leaders, numbers and punctuation (a table of contents), not prose.
_MIN_LETTER_SHARE: Final = 0.5
# Longer "sentences" without punctuation are split at their line breaks.
_LONG_SENTENCE: Final = 64
RANDOM_STATE: Final = 0
# Upper bound on k tried by BIC, as RAGFlow's ``max_cluster`` setting; fitting
# one mixture per candidate k is the dominant cost of clustering.
_MAX_CLUSTERS: Final = 64
# GMMs need a handful of dimensions, not 512: BIC penalises every parameter,
# and in the raw hashing space it would always pick a single cluster.
_REDUCED_DIMS: Final = 10
_HTTP_TIMEOUT: Final = 120.0
_EMBED_BATCH: Final = 64

_WORD: Final = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+")
# Table-of-contents leaders: runs of dots, middle dots, ellipses or underscores.
_LEADER: Final = re.compile(r"(?:[.\u00b7\u2026_]\s?){4,}")
_SENTENCE: Final = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+|\n\s*\n")
# Function words dominate raw counts and would make every text look alike;
# dropping them is the cheapest way to make hashing vectors topical.
_STOPWORDS: Final = frozenset(
    {
        "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as",
        "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can",
        "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further",
        "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his",
        "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my",
        "myself", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "ours",
        "ourselves", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that",
        "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those",
        "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where",
        "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself",
        "yourselves", "also", "may", "might", "must", "shall", "us", "one", "two",
    }
)  # fmt: skip


class RaptorError(RuntimeError):
    """An embedding or summarisation service failed; the task may be retried."""


@dataclass(frozen=True, slots=True)
class Node:
    """A summary in the RAPTOR tree.

    ``level`` starts at 1 (level 0 is the input chunks) and ``index`` is the
    node's position within its level. ``children`` are ``(level, index)``
    references to nodes of any lower level, ``(0, i)`` being input chunk
    ``i``: a cluster of one is carried up instead of summarised, so a child
    may sit several levels below. Every node has at least two children. A
    flat list of nodes plus these references is what the storage layer
    persists.
    """

    level: int
    index: int
    text: str
    children: tuple[Ref, ...]


# --------------------------------------------------------------------------
# Embeddings


def embed(texts: Sequence[str]) -> Vectors:
    """Embed texts as L2-normalised rows, remotely if ``JOBQ_EMBED_URL`` is set."""
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float64)
    url = os.environ.get("JOBQ_EMBED_URL", "").strip()
    if url:
        return _remote_embed(url, list(texts))
    return hashing_embed(texts)


def hashing_embed(texts: Sequence[str]) -> Vectors:
    """Embed texts with signed feature hashing of unigrams and bigrams.

    Hashing needs no vocabulary and no training, so vectors for the same text
    are identical across processes and machines (blake2b, unlike ``hash()``,
    is not salted per process). The sign bit makes colliding features cancel
    instead of pile up, and sublinear term frequency keeps one repeated word
    from dominating a chunk. Texts with no content words map to zero vectors.
    """
    out = np.zeros((len(texts), EMBED_DIM), dtype=np.float64)
    for row, text in enumerate(texts):
        words = [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
        counts: dict[str, int] = {}
        for feature in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
            counts[feature] = counts.get(feature, 0) + 1
        for feature, count in counts.items():
            digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            sign = 1.0 if value & 1 else -1.0
            out[row, (value >> 1) % EMBED_DIM] += sign * (1.0 + math.log(count))
    return _normalise(out)


def _normalise(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: Vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return normalised


def _remote_embed(url: str, texts: list[str]) -> Vectors:
    model = os.environ.get("JOBQ_EMBED_MODEL", "text-embedding-3-small")
    endpoint = url.rstrip("/") + "/embeddings"
    rows: list[list[float]] = []
    for start in range(0, len(texts), _EMBED_BATCH):
        batch = texts[start : start + _EMBED_BATCH]
        reply = _post_json(endpoint, {"model": model, "input": batch}, os.environ.get("JOBQ_EMBED_API_KEY"))
        try:
            items = sorted(reply["data"], key=lambda item: int(item["index"]))
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise RaptorError(
                f"embedding service {endpoint} returned an unexpected response: {exc!r}"
            ) from None
        if len(vectors) != len(batch):
            raise RaptorError(
                f"embedding service {endpoint} returned {len(vectors)} vectors for {len(batch)} texts"
            )
        rows.extend(vectors)
    if len({len(r) for r in rows}) != 1:
        raise RaptorError(f"embedding service {endpoint} returned vectors of differing dimensions")
    return _normalise(np.asarray(rows, dtype=np.float64))


def _post_json(endpoint: str, payload: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    """POST JSON and decode the reply, turning every failure into RaptorError."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode("utf-8"), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        # 429 (or 503 with Retry-After): snooze the task for what the server asks, no retry spent.
        raise_for_backpressure(exc.code, exc.headers)
        detail = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
        raise RaptorError(f"{endpoint} answered HTTP {exc.code}: {detail or exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RaptorError(f"cannot reach {endpoint}: {reason}") from None
    try:
        decoded = json.loads(body)
    except ValueError:
        raise RaptorError(f"{endpoint} returned invalid JSON") from None
    if not isinstance(decoded, dict):
        raise RaptorError(f"{endpoint} returned JSON that is not an object")
    return decoded


# --------------------------------------------------------------------------
# Clustering


def cluster(vectors: Vectors, max_cluster_size: int = DEFAULT_MAX_CLUSTER_SIZE) -> list[list[int]]:
    """Group row indexes of ``vectors`` into clusters of similar texts.

    The number of clusters is chosen by BIC between the fewest that respect
    ``max_cluster_size`` and half the number of points. The upper bound
    guarantees fewer clusters than points, so every RAPTOR level is smaller
    than the one below it and the tree always converges. Clusters still larger
    than ``max_cluster_size`` (a mixture may put most points in one component)
    are clustered again on their own. The output is sorted, members ascending
    and clusters by first member, so it is independent of mixture label order.
    """
    if max_cluster_size < 2:
        raise ValueError(f"max_cluster_size must be at least 2, got {max_cluster_size}")
    n = int(vectors.shape[0])
    if n == 0:
        return []
    clusters = _cluster_indexes(np.asarray(vectors, dtype=np.float64), list(range(n)), max_cluster_size)
    return sorted(sorted(c) for c in clusters)


def _cluster_indexes(vectors: Vectors, members: list[int], max_size: int) -> list[list[int]]:
    n = len(members)
    if n <= 2:
        return [members]
    k_min = max(1, math.ceil(n / max_size))
    k_max = max(k_min, min(n // 2, _MAX_CLUSTERS))
    subset = vectors[members]
    if len(np.unique(subset.round(12), axis=0)) < 2:
        labels = np.zeros(n, dtype=np.int64)  # identical points: nothing to separate
    else:
        labels = _best_mixture_labels(_reduce(subset), k_min, k_max)
    groups: dict[int, list[int]] = {}
    for member, label in zip(members, labels.tolist(), strict=True):
        groups.setdefault(int(label), []).append(member)
    result: list[list[int]] = []
    for group in groups.values():
        if len(group) <= max_size:
            result.append(group)
        elif len(group) < n:
            result.extend(_cluster_indexes(vectors, group, max_size))
        else:
            # The mixture could not separate these points at all; fall back to
            # contiguous slices, which keeps document order as a weak signal.
            result.extend(group[i : i + max_size] for i in range(0, n, max_size))
    return result


def _reduce(points: Vectors) -> Vectors:
    """Project onto a few principal components, deterministically."""
    dims = min(_REDUCED_DIMS, points.shape[0] - 1, points.shape[1])
    if dims < 1:
        return points
    pca = PCA(n_components=dims, svd_solver="full", random_state=RANDOM_STATE)
    reduced: Vectors = pca.fit_transform(points)
    return reduced


def _best_mixture_labels(points: Vectors, k_min: int, k_max: int) -> npt.NDArray[np.int64]:
    best_bic = math.inf
    best: npt.NDArray[np.int64] | None = None
    for k in range(k_min, k_max + 1):
        mixture = GaussianMixture(
            n_components=k,
            covariance_type="diag",
            random_state=RANDOM_STATE,
            n_init=1,
            reg_covar=1e-4,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mixture.fit(points)
        bic = float(mixture.bic(points))
        if bic < best_bic:
            best_bic = bic
            best = np.asarray(mixture.predict(points), dtype=np.int64)
    assert best is not None  # the range is never empty: k_max >= k_min
    return best


# --------------------------------------------------------------------------
# Summaries


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences, treating blank lines as hard breaks."""
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def has_text(text: str) -> bool:
    """Whether a chunk says something a summary could repeat.

    Tables of contents (a few title words drowned in dotted leaders and page
    numbers), bare page numbers and running footers look alike whatever the
    chapter, so clustering them would tie unrelated chapters together, and a
    summary of them is a list of numbers. They stay chunks but join no cluster.
    """
    words = [w for w in _WORD.findall(_LEADER.sub(" ", text)) if not w.isdigit()]
    if len(words) < _MIN_SUMMARY_WORDS:
        return False
    visible = sum(1 for ch in text if not ch.isspace())
    return sum(len(w) for w in words) >= _MIN_LETTER_SHARE * visible


def fit_budget(text: str, max_tokens: int) -> str:
    """Cut ``text`` to ``max_tokens`` tokens, at a sentence end when one is in reach.

    A summary is stored and retrieved like a chunk, so it gets a chunk's budget
    whether a model or the extractive summary wrote it.
    """
    if count_tokens(text) <= max_tokens:
        return text
    kept: list[str] = []
    used = 0
    for sentence in split_sentences(text):
        cost = count_tokens(sentence)
        if used + cost > max_tokens:
            break
        kept.append(sentence)
        used += cost
    if kept:
        return " ".join(kept)
    words: list[str] = []
    used = 1  # the ellipsis that marks the cut
    for word in text.split():
        cost = count_tokens(word)
        if used + cost > max_tokens:
            break
        words.append(word)
        used += cost
    return " ".join(words) + "\u2026"


def _sentences(text: str) -> list[str]:
    """Sentences of one text, whitespace-normalised.

    A run without sentence punctuation (a table, a list) is one "sentence" of
    hundreds of tokens; its lines are the closest thing it has to sentences.
    """
    out: list[str] = []
    for sentence in split_sentences(text):
        parts = sentence.splitlines() if count_tokens(sentence) > _LONG_SENTENCE else [sentence]
        out.extend(" ".join(p.split()) for p in parts if p.strip())
    return out


def summarise(
    texts: Sequence[str],
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> str:
    """Summarise a cluster in at most ``max_tokens`` tokens, via the LLM if ``JOBQ_LLM_URL`` is set.

    The offline summary is extractive: representative sentences (closest to
    the cluster's centroid) taken in turn from different texts, so that every
    text of the cluster has its say before any has two, and put back in their
    original order so the summary still reads naturally. Repeated sentences
    (overlapping chunks repeat their tails) are counted once.
    """
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be at least 1, got {max_sentences}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        return ""
    url = os.environ.get("JOBQ_LLM_URL", "").strip()
    if url:
        return fit_budget(_llm_summary(url, texts, max_sentences, max_tokens), max_tokens)
    return _extractive_summary(texts, max_sentences, max_tokens)


def _extractive_summary(texts: list[str], max_sentences: int, max_tokens: int) -> str:
    pool: list[tuple[int, str]] = []  # (text number, sentence), in reading order
    seen: set[str] = set()
    for owner, text in enumerate(texts):
        for sentence in _sentences(text):
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                pool.append((owner, sentence))
    # Overlapping chunks cut sentences mid-way; a fragment of a sentence that
    # is also present whole adds nothing and reads badly, so drop it.
    whole = [s for _, s in pool]
    pool = [(o, s) for o, s in pool if not any(s != other and s in other for other in whole)]
    # Headings, page footers and table cells are short and made of words that
    # recur everywhere, which puts them right at the centroid; they are labels,
    # not statements, so they only compete when no real sentence exists. A
    # sentence starting in lower case is the cut-off head of an overlap.
    fits = [i for i, (_, s) in enumerate(pool) if count_tokens(s) <= max_tokens]
    prose = [
        i
        for i in fits
        if len(_WORD.findall(pool[i][1])) >= _MIN_SUMMARY_WORDS and not pool[i][1][0].islower() and has_text(pool[i][1])
    ]
    candidates = prose or fits
    if not candidates:  # every sentence alone is over budget: the most central one, cut
        candidates = list(range(len(pool)))
    # Lexical centrality is what matters here, so the local hashing vectors
    # are used even when a remote embedder is configured: one cluster can
    # hold hundreds of sentences, and a network round trip each is not worth it.
    vectors = hashing_embed([pool[i][1] for i in candidates])
    owners = sorted({pool[i][0] for i in candidates})
    # Each text weighs the same in the centroid, however many sentences it has.
    centroid = np.mean(
        [vectors[[k for k, i in enumerate(candidates) if pool[i][0] == o]].mean(axis=0) for o in owners], axis=0
    )
    scores = {i: float(v @ centroid) for i, v in zip(candidates, vectors, strict=True)}
    ranked: dict[int, list[int]] = {o: [] for o in owners}
    for i in sorted(candidates, key=lambda i: (-scores[i], i)):  # position breaks ties: deterministic
        ranked[pool[i][0]].append(i)
    turn = sorted(owners, key=lambda o: (-scores[ranked[o][0]], o))
    chosen: list[int] = []
    used = 0
    for depth in range(max(len(r) for r in ranked.values())):
        for owner in turn:
            if depth < len(ranked[owner]) and len(chosen) < max_sentences:
                cost = count_tokens(pool[ranked[owner][depth]][1])
                if used + cost <= max_tokens:
                    chosen.append(ranked[owner][depth])
                    used += cost
    if not chosen:  # the most central sentence alone is over budget
        return fit_budget(pool[ranked[turn[0]][0]][1], max_tokens)
    # A summary equal to one of its texts adds nothing to the tree (it happens
    # when one text holds every chosen sentence); the least central goes.
    copies = {" ".join(t.split()).lower() for t in texts}
    while len(chosen) > 1 and " ".join(pool[i][1] for i in sorted(chosen)).lower() in copies:
        chosen.remove(min(chosen, key=lambda i: (scores[i], -i)))
    return " ".join(pool[i][1] for i in sorted(chosen))


_SUMMARY_PROMPT: Final = (
    "Summarise the following passages in at most {n} sentences and at most {words} words. Keep names "
    "and numbers exact, do not add facts that are not in the passages, and reply with the summary only."
    "\n\n{body}"
)


def _llm_summary(url: str, texts: list[str], max_sentences: int, max_tokens: int) -> str:
    endpoint = url.rstrip("/") + "/chat/completions"
    # Budget tokens count punctuation too; three words in four leaves room for it.
    prompt = _SUMMARY_PROMPT.format(n=max_sentences, words=max(1, max_tokens * 3 // 4), body="\n\n".join(texts))
    payload = {
        "model": os.environ.get("JOBQ_LLM_MODEL", "gpt-4o-mini"),
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You write faithful, concise summaries."},
            {"role": "user", "content": prompt},
        ],
    }
    reply = _post_json(endpoint, payload, os.environ.get("JOBQ_LLM_API_KEY"))
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RaptorError(f"chat service {endpoint} returned an unexpected response") from None
    if not isinstance(content, str) or not content.strip():
        raise RaptorError(f"chat service {endpoint} returned an empty summary")
    return content.strip()


# --------------------------------------------------------------------------
# Tree


def build_tree(
    chunks: Sequence[str],
    *,
    max_levels: int = DEFAULT_MAX_LEVELS,
    max_cluster_size: int = DEFAULT_MAX_CLUSTER_SIZE,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    on_level: Callable[[int, list[Node], int], None] | None = None,
) -> list[Node]:
    """Build the summary levels above ``chunks`` up to one root and return them flattened.

    Each level clusters what is still without a parent: chunks with text (see
    :func:`has_text`), summaries and anything carried up. A cluster of one
    gets no summary, which would only copy it; its member is carried up to be
    clustered again one level higher, so a node may have children from several
    levels below. :func:`cluster` always returns fewer clusters than points,
    so every level leaves fewer nodes to cluster and the build ends with one
    root; ``max_levels`` only bounds the height, the last allowed level
    summarising everything left into the root. ``on_level(level, nodes,
    remaining)`` runs after each level so the worker can persist progress and
    check for cancellation between the expensive steps; raising from it
    aborts the build. Fewer than two chunks with text need no summary, so the
    tree is empty.
    """
    if max_levels < 1:
        raise ValueError(f"max_levels must be at least 1, got {max_levels}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    texts: dict[Ref, str] = {(0, i): text for i, text in enumerate(chunks)}
    open_refs: list[Ref] = [(0, i) for i, text in enumerate(chunks) if has_text(text)]
    nodes: list[Node] = []
    level = 0
    while len(open_refs) > 1:
        level += 1
        if level == max_levels:
            groups = [list(range(len(open_refs)))]
        else:
            groups = cluster(embed([texts[r] for r in open_refs]), max_cluster_size=max_cluster_size)
        level_nodes: list[Node] = []
        carried: list[Ref] = []  # in the order of the clusters' first members: close to reading order
        for group in groups:
            if len(group) == 1:
                carried.append(open_refs[group[0]])
                continue
            children = tuple(open_refs[j] for j in group)
            node = Node(level, len(level_nodes), summarise([texts[c] for c in children], max_sentences, max_tokens),
                        children)
            texts[(level, node.index)] = node.text
            level_nodes.append(node)
            carried.append((level, node.index))
        nodes.extend(level_nodes)
        open_refs = carried
        if on_level is not None:
            on_level(level, level_nodes, len(open_refs))
    return nodes
