"""The document pipeline on top of jobq, installed as the ``jobq_workers`` package.

A layer of its own: it uses jobq's public API only (``jobqueue.__init__``), keeps its statements in
``sql/documents.sql``, and draws nothing (the CLI renders what :mod:`.watch` and :mod:`.documents`
return). Reading files needs the ``[documents]`` extra (:mod:`.extras`).

Task types (registered through the ``jobq.tasks`` entry points, so producers can validate them):

- ``dataflow`` (:mod:`.dataflow`): extract and chunk one page or row range of a document;
- ``raptor`` (:mod:`.raptor`): summarise a document's chunks into a RAPTOR tree.

Kept import-light: every producer imports these modules to validate task types, and a light install
(no extra) must be able to; pypdf, openpyxl, numpy and scikit-learn load only when a task runs.

Ingesting from Python (:mod:`.ingest`): ``enqueue_document``, ``enqueue_documents``, ``wait_document``
and their ``_async`` twins, imported on first use like jobqueue's own public names.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .documents import BatchResult, FileResult
    from .ingest import (
        DocumentFailed,
        DocumentOptions,
        enqueue_document,
        enqueue_document_async,
        enqueue_documents,
        enqueue_documents_async,
        wait_document,
        wait_document_async,
    )
    from .watch import Row

_WHERE = {
    "BatchResult": ".documents",
    "DocumentFailed": ".ingest",
    "DocumentOptions": ".ingest",
    "FileResult": ".documents",
    "Row": ".watch",
    "enqueue_document": ".ingest",
    "enqueue_document_async": ".ingest",
    "enqueue_documents": ".ingest",
    "enqueue_documents_async": ".ingest",
    "wait_document": ".ingest",
    "wait_document_async": ".ingest",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'jobq_workers' has no attribute {name!r}")
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value
    return value


__all__ = ["BatchResult", "DocumentFailed", "DocumentOptions", "FileResult", "Row", "enqueue_document",
           "enqueue_document_async", "enqueue_documents", "enqueue_documents_async", "wait_document",
           "wait_document_async"]
