"""RAPTOR over a real multi-page document: the stored tree's shape and its links."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
from manual_pdf import manual_pdf
from support import REPO, BackgroundWorker, wait_for

from jobq_workers.documents import enqueue_files

HANDBOOK = str(REPO / "examples" / "samples" / "handbook.pdf")


def test_raptor_tree_over_the_handbook(conn: psycopg.Connection[Any]) -> None:
    res = enqueue_files([HANDBOOK], then="raptor").files[0]
    doc = res.doc_id
    raptor = conn.execute("SELECT status, depends_on, pending_deps, from_page FROM tasks WHERE id = %s",
                          (res.then_task,)).fetchone()
    assert raptor == ("waiting", res.tasks, 4, None)
    with BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.2):
        wait_for(lambda: conn.execute("SELECT status FROM document_progress WHERE doc_id = %s",
                                      (doc,)).fetchone()[0] == "done", timeout=90)
    rows = conn.execute("SELECT id, level, parent_id, from_page, to_page, text, task_id, token_count FROM chunks "
                        "WHERE doc_id = %s", (doc,)).fetchall()
    by_id = {r[0]: r for r in rows}
    levels: dict[int, list[Any]] = {}
    for r in rows:
        levels.setdefault(r[1], []).append(r)
    top = max(levels)
    sizes = [len(levels[k]) for k in sorted(levels)]
    assert top >= 2 and len(levels[top]) == 1, sizes
    [root] = [r for r in rows if r[1] > 0 and r[2] is None]  # exactly one root
    assert root[1] == top
    for r in rows:
        if r[2] is not None:  # a parent sits higher (not always one level: a cluster of one is carried up)
            parent = by_id[r[2]]
            assert parent[1] > r[1] and parent[3] <= r[3] and r[4] <= parent[4]
        else:
            assert r is root, r  # the handbook has no chunk without text: every one is in the tree
    for s in (r for r in rows if r[1] > 0):
        children = [c for c in rows if c[2] == s[0]]
        assert len(children) >= 2 and s[3] == min(c[3] for c in children) and s[4] == max(c[4] for c in children)
        assert s[5].strip() and s[6] == res.then_task and s[7] <= 256
        assert all(" ".join(s[5].split()) != " ".join(c[5].split()) for c in children)
    task = conn.execute("SELECT result, progress_msg, attempt FROM tasks WHERE id = %s",
                        (res.then_task,)).fetchone()
    assert task[0]["summaries"] == len(rows) - sizes[0] and task[0]["chunks"] == sizes[0] and task[2] == 1
    assert "Level 1:" in task[1] or "Stored" in task[1]
    view = conn.execute("SELECT chunks, summaries, tasks FROM document_progress WHERE doc_id = %s",
                        (doc,)).fetchone()
    assert view == (sizes[0], len(rows) - sizes[0], 5)


def test_raptor_leaves_the_contents_out_of_a_manual(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """Chunks without text stay chunks but join no summary; the rest has one root."""
    path = tmp_path / "manual.pdf"
    path.write_bytes(manual_pdf(pages_per_chapter=2))
    res = enqueue_files([str(path)], then="raptor").files[0]
    with BackgroundWorker(["dataflow", "raptor"], concurrency=4, poll_seconds=0.2):
        wait_for(lambda: conn.execute("SELECT status FROM document_progress WHERE doc_id = %s",
                                      (res.doc_id,)).fetchone()[0] == "done", timeout=120)
    rows = conn.execute("SELECT level, parent_id IS NULL, text FROM chunks WHERE doc_id = %s",
                        (res.doc_id,)).fetchall()
    assert sum(1 for level, orphan, _ in rows if level > 0 and orphan) == 1
    left_out = [text for level, orphan, text in rows if level == 0 and orphan]
    # Contents pages and tables mostly of numbers are left out, never a chunk with a real sentence.
    assert any(text.count(".....") >= 3 for text in left_out), left_out
    assert not [text for text in left_out if re.search(r"[A-Z](\w+,? ){5,}\w+\.", text)]
    result, message = conn.execute("SELECT result, progress_msg FROM tasks WHERE id = %s", (res.then_task,)).fetchone()
    assert result["without_text"] == len(left_out)
    assert f"{len(left_out)} chunk(s) without text left out" in message
