"""Worker task implementations for jobq, installed as the ``jobq_workers`` package.

Task types (registered through the ``jobq.tasks`` entry points, so producers can validate them):

- ``dataflow`` (:mod:`.dataflow`): extract and chunk one page or row range of a document;
- ``raptor`` (:mod:`.raptor`): summarise a document's chunks into a RAPTOR tree.

Kept import-light: every producer imports these modules to validate task types.
"""
