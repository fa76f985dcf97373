"""The document pipeline on top of jobq, installed as the ``jobq_workers`` package.

A layer of its own: it uses jobq's public API only (``jobqueue.__init__``), keeps its statements in
``sql/documents.sql``, and draws nothing (the CLI renders what :mod:`.watch` and :mod:`.documents`
return). Reading files needs the ``[documents]`` extra (:mod:`.extras`).

Task types (registered through the ``jobq.tasks`` entry points, so producers can validate them):

- ``dataflow`` (:mod:`.dataflow`): extract and chunk one page or row range of a document;
- ``raptor`` (:mod:`.raptor`): summarise a document's chunks into a RAPTOR tree.

Kept import-light: every producer imports these modules to validate task types, and a light install
(no extra) must be able to; pypdf, openpyxl, numpy and scikit-learn load only when a task runs.
"""
