"""Testing code that uses jobq with jobq's pytest plugin (installed with jobq; nothing to configure).

``jobq_client`` (or ``jobq_url``) gives each test a migrated database of its own; ``drain()`` runs every
runnable task in-process on the real runtime; ``jobq_eager`` runs each task as it is enqueued. The
server is ``JOBQ_TEST_DATABASE_URL``, else an embedded PostgreSQL the plugin starts.

Run: python examples/testing_with_jobq.py  (runs the tests below with pytest)
     or: pytest examples/testing_with_jobq.py
"""

from __future__ import annotations

from typing import Any

from jobqueue import Client, Context, task
from jobqueue.testing import drain


@task("invoice_total")
async def invoice_total(ctx: Context, payload: dict[str, list[float]]) -> float:
    return round(sum(payload["lines"]), 2)


@task("send_invoice")
def send_invoice(ctx: Context, payload: dict[str, Any]) -> str:
    return f"sent to {payload['to']}"


def test_a_pipeline_runs_to_the_end(jobq_client: Client) -> None:
    total = jobq_client.enqueue("invoice_total", {"lines": [10.0, 2.5]})
    sent = jobq_client.enqueue("send_invoice", {"to": "ada@example.com"}, depends_on=[total])
    drain()
    assert jobq_client.get(total).result == 12.5
    assert jobq_client.get(sent).result == "sent to ada@example.com"


def test_eager_mode_runs_tasks_at_enqueue(jobq_client: Client, jobq_eager: None) -> None:
    task_id = jobq_client.enqueue("invoice_total", {"lines": [1.25, 1.25]})
    assert jobq_client.get(task_id).result == 2.5


def test_each_test_starts_empty(jobq_client: Client) -> None:
    assert jobq_client.list() == []


def main() -> int:
    import pytest

    return int(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))


if __name__ == "__main__":
    raise SystemExit(main())
