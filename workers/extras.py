"""The `[documents]` extra: what a light `pip install jobq` lacks, and the one line that says so.

pypdf, openpyxl, python-docx, numpy and scikit-learn are imported where a file or a tree needs them,
never when a module is imported, so producers and the CLI load the pipeline without them.
"""

from __future__ import annotations

import importlib.util

from jobqueue import DocumentError

INSTALL_HINT = "pip install 'jobq[documents]'"
# What enqueueing reads files with; numpy and scikit-learn (raptor) are needed by workers only.
ENQUEUE_NEEDS = ("pypdf", "openpyxl")


class MissingExtra(DocumentError):
    """A package of the document stack is not installed."""


def missing(package: str) -> MissingExtra:
    """The error for one package that failed to import."""
    return MissingExtra(f"{package} is not installed (the [documents] extra): {INSTALL_HINT}")


def require_document_stack() -> None:
    """Refuse in one line when a package enqueueing needs is absent; looked up without importing it."""
    absent = [name for name in ENQUEUE_NEEDS if importlib.util.find_spec(name) is None]
    if absent:
        raise MissingExtra(f"documents need the [documents] extra ({', '.join(absent)} not installed): "
                           f"{INSTALL_HINT}")


__all__ = ["ENQUEUE_NEEDS", "INSTALL_HINT", "MissingExtra", "missing", "require_document_stack"]
