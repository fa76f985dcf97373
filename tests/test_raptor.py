"""RAPTOR over a real multi-page document: the stored tree's shape and its links."""

from __future__ import annotations

from typing import Any

import psycopg
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
    rows = conn.execute("SELECT id, level, parent_id, from_page, to_page, text, task_id FROM chunks "
                        "WHERE doc_id = %s", (doc,)).fetchall()
    by_id = {r[0]: r for r in rows}
    levels: dict[int, list[Any]] = {}
    for r in rows:
        levels.setdefault(r[1], []).append(r)
    top = max(levels)
    sizes = [len(levels[k]) for k in sorted(levels)]
    assert top >= 2 and sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes
    for r in rows:
        if r[1] == top:
            assert r[2] is None
        else:  # every chunk and summary below the top belongs to exactly one summary one level up
            parent = by_id[r[2]]
            assert parent[1] == r[1] + 1 and parent[3] <= r[3] and r[4] <= parent[4]
    for s in (r for r in rows if r[1] > 0):
        children = [c for c in rows if c[2] == s[0]]
        assert children and s[3] == min(c[3] for c in children) and s[4] == max(c[4] for c in children)
        assert s[5].strip() and s[6] == res.then_task
    task = conn.execute("SELECT result, progress_msg, attempt FROM tasks WHERE id = %s",
                        (res.then_task,)).fetchone()
    assert task[0]["summaries"] == len(rows) - sizes[0] and task[0]["chunks"] == sizes[0] and task[2] == 1
    assert "Level 1:" in task[1] or "Stored" in task[1]
    view = conn.execute("SELECT chunks, summaries, tasks FROM document_progress WHERE doc_id = %s",
                        (doc,)).fetchone()
    assert view == (sizes[0], len(rows) - sizes[0], 5)
