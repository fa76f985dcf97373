"""The offline RAPTOR tree and its optional OpenAI-compatible backends."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import pytest
from manual_pdf import manual_pdf

from jobq_workers.chunking import chunk, count_tokens
from jobq_workers.extract import extract
from jobq_workers.raptor_tree import (
    EMBED_DIM,
    Node,
    RaptorError,
    Ref,
    build_tree,
    cluster,
    embed,
    fit_budget,
    has_text,
    split_sentences,
    summarise,
)
from jobq_workers.splitter import count_units

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


@pytest.fixture(scope="module")
def manual_chunks() -> list[str]:
    data = manual_pdf()
    return [c.text for c in chunk(extract("pdf", "manual.pdf", data, 0, count_units("pdf", data)))]


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
    # Two sentences: one from each of the two texts on the cluster's topic; the odd one out waits its turn.
    summary = summarise(texts, max_sentences=2)
    picked = split_sentences(summary)
    assert len(picked) == 2
    assert picked[0] in texts[0] and picked[1] in texts[2]
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


def test_summary_takes_sentences_from_different_texts() -> None:
    bees = [
        "Worker bees change jobs as they age and finally become foragers.",
        "The queen lays up to two thousand eggs on a good summer day.",
        "Smoke calms the bees because it masks the alarm pheromone of the guards.",
        "Beekeepers inspect the brood frames every week in spring for queen cells.",
    ]
    first, second = " ".join(bees), "A strong bee colony needs twenty kilograms of honey to survive the winter."
    summary = summarise([first, second], max_sentences=3)
    assert second in summary  # the short text has its say before the long one has a third
    assert len(split_sentences(summary)) == 3 and summary != first
    # Everything of one text would be a copy of it: a sentence is left out instead.
    assert summarise([bees[0] + " " + bees[1], bees[1]], max_sentences=5) != bees[0] + " " + bees[1]


def test_summary_stays_within_the_token_budget() -> None:
    texts = [" ".join(TOPICS.values()) * 3, TOPICS["bees"]]
    for budget in (5, 20, 40, 256):
        summary = summarise(texts, max_sentences=10, max_tokens=budget)
        assert 0 < count_tokens(summary) <= budget, (budget, summary)
    table = "\n".join(f"row {i} queen worker drone {i * 7} {i / 3:.3f}" for i in range(80))  # no full stops
    summary = summarise([table, table.replace("row", "line")], max_tokens=64)
    assert count_tokens(summary) <= 64 and len(summary.split()) >= 6
    with pytest.raises(ValueError, match="max_tokens"):
        summarise(["text"], max_tokens=0)


def test_fit_budget_cuts_at_a_sentence_end_when_it_can() -> None:
    text = "One two three. Four five six seven. Eight."
    assert fit_budget(text, 100) == text
    assert fit_budget(text, 8) == "One two three."  # the second sentence would make nine tokens
    assert fit_budget("a b c d e f g h", 4) == "a b c\u2026"


def test_has_text_leaves_out_contents_and_page_numbers() -> None:
    assert has_text(TOPICS["bees"])
    assert not has_text("12")
    assert not has_text("Operator manual - 12")
    contents = "\n".join(f"{n}. Beekeeping, section {n} {'.' * 50} {n + 4}" for n in range(1, 8))
    assert not has_text(contents)
    assert not has_text("Contents \u2026\u2026\u2026\u2026 3\nIndex \u00b7\u00b7\u00b7\u00b7\u00b7 9")
    assert has_text(contents + "\n\n" + " ".join(TOPICS.values()) * 2)  # the contents' last page runs into prose


# -- tree --------------------------------------------------------------------


def _check_tree(nodes: list[Node], chunks: list[str], max_tokens: int = 256) -> dict[Ref, Node]:
    """The shape RAPTOR intends, whatever the input: one root over every chunk with text."""
    by_ref = {(n.level, n.index): n for n in nodes}
    assert len(by_ref) == len(nodes)
    assert [n.level for n in nodes] == sorted(n.level for n in nodes)
    for level in {n.level for n in nodes}:
        assert sorted(n.index for n in nodes if n.level == level) == list(range(sum(n.level == level for n in nodes)))
    parents: dict[Ref, Ref] = {}
    for node in nodes:
        assert len(node.children) >= 2, node  # never a node with a single child
        for child in node.children:
            assert child[0] < node.level and (child in by_ref or (child[0] == 0 and 0 <= child[1] < len(chunks)))
            assert child not in parents, child  # every node has at most one parent
            parents[child] = (node.level, node.index)
    roots = [ref for ref in by_ref if ref not in parents]
    assert len(roots) == 1, roots  # exactly one root
    assert roots[0][0] == max(n.level for n in nodes)
    leaves = sorted(c[1] for c in parents if c[0] == 0)
    assert leaves == [i for i, text in enumerate(chunks) if has_text(text)]  # every chunk with text, once
    text_of = {**{(0, i): t for i, t in enumerate(chunks)}, **{r: n.text for r, n in by_ref.items()}}
    for node in nodes:
        assert count_tokens(node.text) <= max_tokens, node.text  # within the chunk budget
        assert len(node.text.split()) >= 2, node.text  # never a one-word summary
        summary = " ".join(node.text.split())
        assert all(summary != " ".join(text_of[c].split()) for c in node.children), node  # never a copy
    return by_ref


def test_tree_over_the_sample_pdf(sample_chunks: list[str], sample_pages: list[tuple[int, int]]) -> None:
    calls: list[tuple[int, int, int]] = []
    nodes = build_tree(sample_chunks, on_level=lambda lvl, ns, left: calls.append((lvl, len(ns), left)))
    _check_tree(nodes, sample_chunks)
    levels = max(n.level for n in nodes)
    assert [c[:2] for c in calls] == [(lvl, sum(n.level == lvl for n in nodes)) for lvl in range(1, levels + 1)]
    remaining = [c[2] for c in calls]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 1 and len(set(remaining)) == levels
    # The sample's topics occupy runs of about four pages, so a topical
    # clustering groups chunks from nearby pages.
    spans = [
        max(sample_pages[c][1] for _, c in n.children) - min(sample_pages[c][0] for _, c in n.children)
        for n in nodes
        if all(level == 0 for level, _ in n.children)
    ]
    assert sum(span <= 6 for span in spans) >= 0.8 * len(spans), spans
    assert nodes == build_tree(sample_chunks)  # deterministic


def test_tree_over_a_long_manual(manual_chunks: list[str]) -> None:
    """A table of contents, footers, one-word headings, tables and near-empty pages, as real manuals have."""
    nodes = build_tree(manual_chunks)
    by_ref = _check_tree(nodes, manual_chunks)
    # Pages of contents, not the chunk where the contents run into the first chapter's prose.
    contents = [i for i, t in enumerate(manual_chunks) if t.count(".....") >= 3 and not re.search(r"[a-z]\. [A-Z]", t)]
    assert contents and not any((0, i) in n.children for i in contents for n in nodes)
    # An extractive summary draws on several of its children, not on one, when several have prose
    # (table rows and headings only stand in when no child has a real sentence).
    text_of = {(0, i): " ".join(t.split()) for i, t in enumerate(manual_chunks)}
    text_of.update({r: n.text for r, n in by_ref.items()})
    for node in nodes:
        sources = {c for c in node.children for s in split_sentences(node.text) if s in text_of[c]}
        prose = [c for c in node.children if re.search(r"[A-Z](\w+,? ){5,}\w+\.", text_of[c])]
        assert len(sources) >= min(2, len(prose)), node


def test_carried_up_children_skip_levels(sample_chunks: list[str]) -> None:
    nodes = build_tree(sample_chunks, max_cluster_size=3)
    _check_tree(nodes, sample_chunks)
    assert any(level < n.level - 1 for n in nodes for level, _ in n.children)  # a cluster of one was carried up


def test_max_levels_bounds_the_height_but_keeps_one_root(sample_chunks: list[str]) -> None:
    [root] = build_tree(sample_chunks, max_levels=1)
    assert root.level == 1 and root.children == tuple((0, i) for i in range(len(sample_chunks)))
    assert count_tokens(root.text) <= 256
    nodes = build_tree(sample_chunks, max_levels=2, max_cluster_size=4)
    _check_tree(nodes, sample_chunks)
    assert max(n.level for n in nodes) == 2


def test_summary_budget(sample_chunks: list[str]) -> None:
    nodes = build_tree(sample_chunks, max_tokens=40, max_sentences=20)
    _check_tree(nodes, sample_chunks, max_tokens=40)


def test_callback_can_abort_the_build(sample_chunks: list[str]) -> None:
    class Stop(Exception):
        pass

    def stop(level: int, nodes: list[Node], remaining: int) -> None:
        raise Stop(level)

    with pytest.raises(Stop):
        build_tree(sample_chunks, on_level=stop)


def test_tiny_inputs() -> None:
    assert build_tree([]) == []
    assert build_tree([TOPICS["bees"]]) == []
    assert build_tree([TOPICS["bees"], "Contents .......... 3", "12"]) == []  # one chunk with text: no summary
    [root] = build_tree([TOPICS["bees"], TOPICS["trains"]])
    assert root == Node(1, 0, f"{TOPICS['bees']} {TOPICS['trains']}", ((0, 0), (0, 1)))
    with pytest.raises(ValueError):
        build_tree(["a", "b"], max_levels=0)
    with pytest.raises(ValueError):
        build_tree(["a", "b"], max_tokens=0)


# -- remote backends ---------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    requests: list[tuple[str, dict[str, Any], str | None]] = []
    fail_with: int | None = None
    summary = "  A model summary.  "

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
            reply = {"choices": [{"message": {"role": "assistant", "content": self.summary}}]}
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
    _Handler.summary = "  A model summary.  "
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
    assert "at most 2 sentences and at most 192 words" in prompt
    assert "First passage.\n\nSecond passage." in prompt


def test_remote_summary_is_held_to_the_budget(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model may ignore the prompt's word limit; the budget is enforced on its reply."""
    monkeypatch.setenv("JOBQ_LLM_URL", server)
    _Handler.summary = "The first sentence is short. " + "Then a model rambles on and on. " * 40
    summary = summarise(["First passage.", "Second passage."], max_tokens=20)
    assert summary == "The first sentence is short. Then a model rambles on and on."
    [(_, body, _)] = _Handler.requests
    assert "at most 15 words" in body["messages"][-1]["content"]


def test_remote_http_error_is_reported(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _Handler.fail_with = 503
    monkeypatch.setenv("JOBQ_LLM_URL", server)
    with pytest.raises(RaptorError, match=r"chat/completions answered HTTP 503: .*model overloaded"):
        summarise(["Some text."])


def test_unreachable_service_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_EMBED_URL", "http://127.0.0.1:9")
    with pytest.raises(RaptorError, match=r"cannot reach http://127.0.0.1:9/embeddings"):
        embed(["text"])
