"""Alembic migrations, shipped inside the wheel as ``jobqueue.migrations``."""
