"""Statements kept as SQL in `.sql` files, one file per part of jobq (River's layout).

A file is a series of blocks, each opened by ``-- name: <statement>``; ``{schema}`` is the one
placeholder, replaced by the configured schema (it appears as ``{schema}.tasks`` and in channel
names such as ``'{schema}.cancel'``). Parameters are PostgreSQL's own ``$1, $2 ...`` (asyncpg, and
psycopg's RawCursor), so one text serves both drivers.

Each file is declared by a subclass that lists its statements as ``str`` attributes. The declaration
is checked against the file when the class is created, i.e. at import: a statement that is missing,
misspelt or left unused fails there, and every use (``q.claim``) is checked by mypy.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from typing import ClassVar, Self

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)
SCHEMA_PLACEHOLDER = "{schema}"


@cache
def parse(package: str, filename: str) -> dict[str, str]:
    """The named statements of one file, comments and the trailing semicolon removed."""
    text = files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    statements: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in statements:
            raise TypeError(f"{filename}: statement {name!r} is defined twice")
        sql = "\n".join(line for line in body.strip().splitlines() if not line.lstrip().startswith("--"))
        statements[name] = sql.strip().rstrip(";")
    return statements


class SQLFile:
    """The statements of one `.sql` file for one schema: ``RuntimeSQL.load("jobq").claim``."""

    package: ClassVar[str]
    filename: ClassVar[str]

    def __init_subclass__(cls, *, package: str, filename: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.package, cls.filename = package, filename
        declared = {name for name, kind in cls.__annotations__.items() if kind in ("str", str)}
        defined = set(parse(package, filename))
        if declared != defined:
            missing, unused = sorted(declared - defined), sorted(defined - declared)
            raise TypeError(f"{cls.__name__} and {filename} disagree: declared but not in the file {missing}, "
                            f"in the file but not declared {unused}")

    def __init__(self, schema: str) -> None:
        for name, sql in parse(self.package, self.filename).items():
            setattr(self, name, sql.replace(SCHEMA_PLACEHOLDER, schema))

    @classmethod
    def load(cls, schema: str) -> Self:
        """The statements for `schema`, built once per (file, schema)."""
        loaded = _loaded.get((cls, schema))
        if loaded is None:
            loaded = _loaded[(cls, schema)] = cls(schema)
        assert isinstance(loaded, cls)
        return loaded

    @classmethod
    def names(cls) -> list[str]:
        return sorted(parse(cls.package, cls.filename))


_loaded: dict[tuple[type[SQLFile], str], SQLFile] = {}
