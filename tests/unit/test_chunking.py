"""Token-bounded, paragraph-respecting chunking with overlap."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from jobq_workers.chunking import chunk, count_tokens, tokenize
from jobq_workers.extract import Segment, extract


def _words(start: int, count: int) -> str:
    """Unique tokens, so overlaps can be located unambiguously."""
    return " ".join(f"w{i}" for i in range(start, start + count))


def test_tokenizer_counts_words_and_punctuation() -> None:
    assert tokenize("Hello, world! It's 3.5 km.") == [
        "Hello",
        ",",
        "world",
        "!",
        "It",
        "'",
        "s",
        "3",
        ".",
        "5",
        "km",
        ".",
    ]
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("   \n\n ") == 0


def test_small_paragraphs_are_packed_whole() -> None:
    paragraphs = [_words(i * 10, 10) for i in range(10)]  # 10 tokens each
    chunks = chunk([Segment(0, "\n\n".join(paragraphs))], max_tokens=35, overlap=0)
    assert [c.token_count for c in chunks] == [30, 30, 30, 10]
    for c in chunks:
        for part in c.text.split("\n\n"):
            assert part in paragraphs  # whole paragraphs only, never a cut one


def test_paragraphs_are_not_split_when_they_fit() -> None:
    paragraphs = [_words(0, 20), _words(20, 25), _words(45, 15), _words(60, 30)]
    chunks = chunk([Segment(0, "\n\n".join(paragraphs))], max_tokens=40, overlap=5)
    for paragraph in paragraphs:
        assert any(paragraph in c.text for c in chunks), paragraph


def test_overlap_repeats_the_tail_of_the_previous_chunk() -> None:
    paragraphs = [_words(i * 10, 10) for i in range(12)]
    chunks = chunk([Segment(0, "\n\n".join(paragraphs))], max_tokens=40, overlap=6)
    assert len(chunks) > 2
    for prev, nxt in itertools.pairwise(chunks):
        assert tokenize(nxt.text)[:6] == tokenize(prev.text)[-6:]
    # Removing the overlaps gives back the original token stream exactly.
    stream = tokenize(chunks[0].text) + [t for c in chunks[1:] for t in tokenize(c.text)[6:]]
    assert stream == tokenize(" ".join(paragraphs))


def test_without_overlap_every_token_appears_once() -> None:
    text = "\n\n".join(_words(i * 17, 17) for i in range(20))
    chunks = chunk([Segment(0, text)], max_tokens=50, overlap=0)
    assert [t for c in chunks for t in tokenize(c.text)] == tokenize(text)


def test_overlap_shrinks_so_max_tokens_is_a_hard_limit() -> None:
    paragraphs = [_words(0, 10), _words(10, 38), _words(48, 5)]
    chunks = chunk([Segment(0, "\n\n".join(paragraphs))], max_tokens=40, overlap=8)
    assert all(c.token_count <= 40 for c in chunks)
    # The 38-token paragraph leaves room for only 2 overlap tokens.
    assert chunks[1].text.startswith("w8 w9\n\nw10 ")


def test_oversized_paragraph_is_split_on_sentences() -> None:
    sentences = [f"Sentence {i} talks about topic {i} in some detail here." for i in range(12)]  # 11 tokens
    chunks = chunk([Segment(0, " ".join(sentences))], max_tokens=30, overlap=0)
    assert all(c.token_count <= 30 for c in chunks)
    for sentence in sentences:
        assert sum(sentence in c.text for c in chunks) == 1
    assert [c.token_count for c in chunks] == [22, 22, 22, 22, 22, 22]


def test_oversized_sentence_is_split_on_tokens() -> None:
    text = _words(0, 100)  # no sentence punctuation at all
    chunks = chunk([Segment(0, text)], max_tokens=30, overlap=0)
    assert [c.token_count for c in chunks] == [30, 30, 30, 10]
    assert " ".join(c.text for c in chunks) == text


def test_page_ranges_follow_the_source_segments() -> None:
    segments = [Segment(4, _words(0, 20)), Segment(5, _words(20, 20)), Segment(6, _words(40, 20))]
    chunks = chunk(segments, max_tokens=45, overlap=5)
    assert [(c.first_page, c.last_page) for c in chunks] == [(4, 5), (5, 6)]
    # The second chunk's overlap comes from page 5 and its new text from page 6.
    assert chunks[1].text.startswith("w35 w36 w37 w38 w39\n\nw40")


def test_chunk_metadata() -> None:
    chunks = chunk([Segment(0, "\n\n".join(_words(i * 30, 30) for i in range(5)))], max_tokens=64, overlap=4)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.digest == hashlib.sha256(c.text.encode("utf-8")).hexdigest()
        assert c.token_count == count_tokens(c.text)


def test_empty_input_gives_no_chunks() -> None:
    assert chunk([]) == []
    assert chunk([Segment(0, "  \n\n  ")]) == []


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_invalid_budgets(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk([Segment(0, "text")], max_tokens=max_tokens, overlap=overlap)


def test_sample_pdf_chunks(handbook_pdf: bytes) -> None:
    segments = extract("pdf", "handbook.pdf", handbook_pdf, 0, 37)
    chunks = chunk(segments)
    assert 20 < len(chunks) < 80
    assert all(0 < c.token_count <= 256 for c in chunks)
    assert chunks[0].first_page == 0
    assert chunks[-1].last_page == 36
    assert all(a.first_page <= b.first_page for a, b in itertools.pairwise(chunks))
    # The sample's paragraphs are all under 256 tokens, so none may be cut.
    paragraphs = [p for s in segments for p in s.text.split("\n\n")]
    assert len(paragraphs) > 100
    for paragraph in paragraphs:
        assert any(paragraph in c.text for c in chunks), paragraph
