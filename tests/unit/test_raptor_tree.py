"""The offline RAPTOR tree and its optional OpenAI-compatible backends."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import pytest

from jobq_workers.chunking import chunk
from jobq_workers.extract import extract
from jobq_workers.raptor_tree import (
    EMBED_DIM,
    Node,
    RaptorError,
    build_tree,
    cluster,
    embed,
    split_sentences,
    summarise,
)

TOPICS = {
    "bees": "The queen bee lays eggs in the hive while worker bees collect nectar and pollen for honey.",
    "trains": "The steam locomotive pulled the passenger train along the railway track to the station.",
    "volcano": "The volcano erupted, and hot lava and volcanic ash poured down the slopes of the mountain.",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default path must never depend on the caller's environment."""
    for name in ("JOBQ_EMBED_URL", "JOBQ_LLM_URL", "JOBQ_EMBED_MODEL", "JOBQ_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sample_chunks(handbook_pdf: bytes) -> list[str]:
    return [c.text for c in chunk(extract("pdf", "handbook.pdf", handbook_pdf, 0, 37))]


@pytest.fixture(scope="module")
def sample_pages(handbook_pdf: bytes) -> list[tuple[int, int]]:
    return [(c.first_page, c.last_page) for c in chunk(extract("pdf", "handbook.pdf", handbook_pdf, 0, 37))]


# -- embeddings --------------------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors() -> None:
    texts = list(TOPICS.values())
    vectors = embed(texts)
    assert vectors.shape == (3, EMBED_DIM)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert np.array_equal(vectors, embed(texts))


def test_embeddings_reflect_topical_similarity() -> None:
    vectors = embed(
        [
            TOPICS["bees"],
            "Worker bees bring nectar back to the hive, and the queen bee keeps laying eggs.",
            TOPICS["trains"],
        ]
    )
    assert vectors[0] @ vectors[1] > 0.3
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_texts_without_content_words_embed_to_zero() -> None:
    vectors = embed(["", "the and of", TOPICS["bees"]])
    assert not vectors[0].any()
    assert not vectors[1].any()
    assert vectors[2].any()
    assert embed([]).shape == (0, EMBED_DIM)


# -- clustering --------------------------------------------------------------


def _topic_texts() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for i in range(6):
        for label, text in TOPICS.items():
            texts.append(f"{text} Note {i}.")
            labels.append(label)
    return texts, labels


def test_cluster_recovers_separated_topics() -> None:
    texts, labels = _topic_texts()
    clusters = cluster(embed(texts), max_cluster_size=6)
    assert sorted(i for c in clusters for i in c) == list(range(len(texts)))
    for members in clusters:
        assert len({labels[i] for i in members}) == 1
    assert len(clusters) == 3


def test_cluster_respects_max_size_and_always_shrinks(sample_chunks: list[str]) -> None:
    vectors = embed(sample_chunks)
    for max_size in (2, 3, 5, 10, 100):
        clusters = cluster(vectors, max_cluster_size=max_size)
        assert sorted(i for c in clusters for i in c) == list(range(len(sample_chunks)))
        assert all(1 <= len(c) <= max_size for c in clusters)
        assert len(clusters) < len(sample_chunks)
        assert clusters == cluster(vectors, max_cluster_size=max_size)  # deterministic


def test_identical_vectors_fall_back_to_slices() -> None:
    vectors = np.tile(embed([TOPICS["bees"]]), (7, 1))
    assert cluster(vectors, max_cluster_size=3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_cluster_edge_cases() -> None:
    assert cluster(np.zeros((0, EMBED_DIM))) == []
    assert cluster(embed([TOPICS["bees"]])) == [[0]]
    assert cluster(embed([TOPICS["bees"], TOPICS["trains"]])) == [[0, 1]]
    with pytest.raises(ValueError, match="max_cluster_size"):
        cluster(embed([TOPICS["bees"]]), max_cluster_size=1)


# -- summaries ---------------------------------------------------------------


def test_summary_picks_central_sentences_in_original_order() -> None:
    texts = [
        "Bees make honey in the hive. Honey bees store honey in wax cells.",
        "The stock market fell sharply on Tuesday afternoon.",
        "A strong hive of bees makes plenty of honey. Bees guard the honey in the hive.",
    ]
    summary = summarise(texts, max_sentences=3)
    picked = split_sentences(summary)
    assert len(picked) == 3
    assert "The stock market fell sharply on Tuesday afternoon." not in picked
    source = split_sentences(" ".join(texts))
    assert [source.index(s) for s in picked] == sorted(source.index(s) for s in picked)


def test_summary_drops_duplicates_fragments_and_headings() -> None:
    texts = [
        "Beekeeping, part 1\n\nWorker bees change jobs as they age and finally become foragers. "
        "The queen lays up to two thousand eggs on a good summer day.",
        "lays up to two thousand eggs on a good summer day. "
        "Worker bees change jobs as they age and finally become foragers. "
        "Smoke calms the bees because it masks the alarm pheromone of the guards.",
    ]
    summary = summarise(texts, max_sentences=2)
    assert summary.startswith(("Worker bees", "The queen", "Smoke"))
    assert summary.count("Worker bees change jobs") <= 1
    assert "Beekeeping, part 1" not in summary
    assert summarise(["Short text."], max_sentences=3) == "Short text."
    assert summarise(["  "]) == ""


# -- tree --------------------------------------------------------------------


def _check_tree(nodes: list[Node], n_chunks: int, max_levels: int) -> list[list[Node]]:
    levels: list[list[Node]] = []
    for node in nodes:
        if node.level > len(levels):
            levels.append([])
        levels[node.level - 1].append(node)
    assert [n.level for n in nodes] == sorted(n.level for n in nodes)
    sizes = [n_chunks] + [len(level) for level in levels]
    assert all(a > b for a, b in itertools.pairwise(sizes)), sizes  # levels shrink
    assert len(levels) == max_levels or len(levels[-1]) == 1
    for depth, level in enumerate(levels):
        below = sizes[depth]
        assert [n.index for n in level] == list(range(len(level)))
        children = sorted(c for n in level for c in n.children)
        assert children == list(range(below))  # children partition the level below
        assert all(n.text.strip() for n in level)
    return levels


def test_tree_over_the_sample_pdf(sample_chunks: list[str], sample_pages: list[tuple[int, int]]) -> None:
    calls: list[tuple[int, int]] = []
    nodes = build_tree(sample_chunks, max_levels=3, on_level=lambda lvl, ns: calls.append((lvl, len(ns))))
    levels = _check_tree(nodes, len(sample_chunks), 3)
    assert calls == [(i + 1, len(level)) for i, level in enumerate(levels)]
    # The sample's topics occupy runs of about four pages, so a topical
    # clustering groups chunks from nearby pages.
    spans = [
        max(sample_pages[c][1] for c in n.children) - min(sample_pages[c][0] for c in n.children)
        for n in levels[0]
    ]
    assert sum(span <= 6 for span in spans) >= 0.8 * len(spans), spans
    assert nodes == build_tree(sample_chunks, max_levels=3)  # deterministic


def test_tree_reaches_a_single_root_given_enough_levels(sample_chunks: list[str]) -> None:
    nodes = build_tree(sample_chunks, max_levels=20, max_cluster_size=5)
    levels = _check_tree(nodes, len(sample_chunks), 20)
    assert len(levels[-1]) == 1
    assert len(levels) < 20


def test_tree_stops_at_max_levels(sample_chunks: list[str]) -> None:
    nodes = build_tree(sample_chunks, max_levels=1, max_cluster_size=4)
    assert {n.level for n in nodes} == {1}
    assert len(nodes) > 1


def test_callback_can_abort_the_build(sample_chunks: list[str]) -> None:
    class Stop(Exception):
        pass

    def stop(level: int, nodes: list[Node]) -> None:
        raise Stop(level)

    with pytest.raises(Stop):
        build_tree(sample_chunks, on_level=stop)


def test_tiny_inputs() -> None:
    assert build_tree([]) == []
    assert build_tree(["only one chunk"]) == []
    [root] = build_tree([TOPICS["bees"], TOPICS["trains"]])
    assert root == Node(1, 0, f"{TOPICS['bees']} {TOPICS['trains']}", (0, 1))
    with pytest.raises(ValueError):
        build_tree(["a", "b"], max_levels=0)


# -- remote backends ---------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict[str, Any], str | None]] = []
    fail_with: int | None = None

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body, self.headers.get("Authorization")))
        if self.fail_with is not None:
            self.send_response(self.fail_with)
            self.end_headers()
            self.wfile.write(b'{"error": "model overloaded"}')
            return
        if self.path == "/v1/embeddings":
            # Reply out of order to prove the client sorts by index.
            data = [{"index": i, "embedding": [float(len(t)), 1.0, 0.0]} for i, t in enumerate(body["input"])]
            reply: dict[str, Any] = {"data": list(reversed(data))}
        else:
            reply = {"choices": [{"message": {"role": "assistant", "content": "  A model summary.  "}}]}
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.requests = []
    _Handler.fail_with = None
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_remote_embeddings(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_EMBED_URL", server + "/")
    monkeypatch.setenv("JOBQ_EMBED_MODEL", "tiny-embed")
    monkeypatch.setenv("JOBQ_EMBED_API_KEY", "k123")
    vectors = embed(["abc", "a"])
    expected = np.array([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert np.allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True))
    [(path, body, auth)] = _Handler.requests
    assert (path, body, auth) == (
        "/v1/embeddings",
        {"model": "tiny-embed", "input": ["abc", "a"]},
        "Bearer k123",
    )


def test_remote_summary(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_LLM_URL", server)
    monkeypatch.setenv("JOBQ_LLM_MODEL", "tiny-chat")
    assert summarise(["First passage.", "Second passage."], max_sentences=2) == "A model summary."
    [(path, body, auth)] = _Handler.requests
    assert path == "/v1/chat/completions"
    assert body["model"] == "tiny-chat"
    assert auth is None
    prompt = body["messages"][-1]["content"]
    assert "at most 2 sentences" in prompt
    assert "First passage.\n\nSecond passage." in prompt


def test_remote_http_error_is_reported(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _Handler.fail_with = 503
    monkeypatch.setenv("JOBQ_LLM_URL", server)
    with pytest.raises(RaptorError, match=r"chat/completions answered HTTP 503: .*model overloaded"):
        summarise(["Some text."])


def test_unreachable_service_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_EMBED_URL", "http://127.0.0.1:9")
    with pytest.raises(RaptorError, match=r"cannot reach http://127.0.0.1:9/embeddings"):
        embed(["text"])
