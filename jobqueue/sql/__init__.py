"""The query manager: loads queries.sql once and hands out each named query for a schema.

The SQL stays in one file (procrastinate's model) so the hot path can be reviewed as SQL;
Python only picks a query by name.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.resources import files

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)
_SCHEMA_REF = re.compile(r"\bjobq\.")


@lru_cache(maxsize=1)
def _raw() -> dict[str, str]:
    text = files(__package__).joinpath("queries.sql").read_text()
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(line for line in body.strip().splitlines() if not line.lstrip().startswith("--"))
        queries[name] = sql.strip().rstrip(";")
    return queries


class Queries:
    """All of jobq's queries, rewritten for one schema (`jobq.` → `<schema>.`)."""

    def __init__(self, schema: str = "jobq") -> None:
        self.schema = schema
        raw = _raw()
        if schema == "jobq":
            self._q = dict(raw)
        else:
            self._q = {name: _SCHEMA_REF.sub(f"{schema}.", sql) for name, sql in raw.items()}

    def __getitem__(self, name: str) -> str:
        return self._q[name]

    def __getattr__(self, name: str) -> str:
        try:
            return self._q[name]
        except KeyError:
            raise AttributeError(name) from None

    def names(self) -> list[str]:
        return sorted(self._q)


@lru_cache(maxsize=8)
def queries(schema: str) -> Queries:
    return Queries(schema)
