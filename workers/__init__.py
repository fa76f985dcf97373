"""Worker task implementations for jobq, installed as the ``jobq_workers`` package."""
