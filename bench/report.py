"""Render a results document (see ``orchestrator.Runner.run``) as Markdown."""

from __future__ import annotations

import json
from typing import Any

ROW_TITLES: dict[str, str] = {
    "enqueue_single": "Enqueue one by one (jobs/s)",
    "enqueue_concurrent": "Single enqueue from 64 coroutines; 16 threads (jobs/s, call p50 / p99)",
    "enqueue_batch": "Enqueue with batch API (jobs/s)",
    "drain_1p_default": "Drain, 1 process, defaults (jobs/s)",
    "drain_1p_tuned": "Drain, 1 process, tuned (jobs/s)",
    "drain_2p_default": "Drain, 2 processes, defaults (jobs/s)",
    "drain_2p_tuned": "Drain, 2 processes, tuned (jobs/s)",
    "latency": "Latency enqueue → handler start, p50 / p95 / p99 (ms)",
    "cancel": "Cancel running job → handler sees it, p50 / p95 (ms)",
}


def _cell(case: dict[str, Any] | None) -> str:
    if case is None:
        return "—"
    median = case.get("median") or {}
    if "threads" in median:  # enqueue_concurrent: coroutines, then threads, each with its call p50 / p99
        return "; ".join(f"{who} {m['jobs_per_s']:,.0f} ({m['p50_ms']:.1f} / {m['p99_ms']:.1f} ms)"
                         for who, m in (("coroutines", median), ("threads", median["threads"])))
    if "jobs_per_s" in median:
        return f"{median['jobs_per_s']:,.0f}"
    if "p50_ms" in median:
        parts = [median["p50_ms"], median["p95_ms"]]
        if case.get("key") != "cancel" and "p99_ms" in median:
            parts.append(median["p99_ms"])
        return " / ".join(f"{p:.1f}" for p in parts)
    runs = case.get("runs") or [{}]
    return "n/a" if runs[0].get("unsupported") else "error"


def _peer_title(peer: str, data: dict[str, Any]) -> str:
    if data.get("skipped"):
        return f"{peer} (skipped)"
    if peer == "pgbench":
        return "pgbench (raw SQL ceiling)"
    return f"{peer} {data.get('version', '')}".strip()


def render_markdown(doc: dict[str, Any]) -> str:
    peers: dict[str, dict[str, Any]] = doc["peers"]
    server = doc["server"]
    m = doc["machine"]
    lines = [
        "# Peer benchmarks",
        "",
        f"- Date: {doc['date']} (UTC); total wall time {doc.get('total_seconds', '?')} s",
        f"- Profile: `{doc['profile']}`: {doc['n']:,} jobs per throughput case, "
        f"{doc['runs_per_case']} run(s) per case, median shown"
        + (f"; a drain that took less than {doc['min_drain_s']} s is measured again with more jobs (see Notes)"
           if doc.get("min_drain_s") else ""),
        f"- Command: `{doc['command']}`",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}, orchestrator Python {m['python']}",
        f"- PostgreSQL {server['server_version']}: fsync={server['fsync']}, "
        f"synchronous_commit={server['synchronous_commit']}, full_page_writes={server['full_page_writes']}, "
        f"wal_level={server['wal_level']}, shared_buffers={server['shared_buffers']} "
        "(same server for every peer, each in its own fresh database per run)",
    ]
    redis = _redis_facts(peers)
    if redis:
        lines.append(f"- Redis (Celery broker): {redis}")
    lines += [
        "",
        "| Scenario | " + " | ".join(_peer_title(p, d) for p, d in peers.items()) + " |",
        "|---|" + "---:|" * len(peers),
    ]
    for key in doc["cases"]:
        cells = []
        for data in peers.values():
            case = (data.get("cases") or {}).get(key)
            cells.append(_cell({**case, "key": key} if case else None))
        lines.append(f"| {ROW_TITLES.get(key, key)} | " + " | ".join(cells) + " |")
    lines += ["", "## Settings used", ""]
    for peer, data in peers.items():
        if data.get("skipped"):
            continue
        lines.append(f"- **{peer}**")
        for key, case in (data.get("cases") or {}).items():
            if case.get("settings"):
                lines.append(f"  - `{key}`: `{json.dumps(case['settings'], sort_keys=True)}`")
    notes = list(doc.get("notes") or [])
    for peer, data in peers.items():
        for key, case in (data.get("cases") or {}).items():
            first = case.get("at_profile_n")
            if first:
                notes.append(f"{peer} `{key}`: {case['n']:,} jobs; {doc['n']:,} drained in under "
                             f"{doc.get('min_drain_s')} s, at {first['metric']['jobs_per_s']:,.0f} jobs/s (one run)")
            for run in case.get("runs") or []:
                if run.get("unsupported"):
                    notes.append(f"{peer} `{key}`: n/a, {run.get('note')}")
                    break
                if not run.get("ok"):
                    notes.append(f"{peer} `{key}`: error: {str(run.get('error'))[:300]}")
                    break
    lines += ["", "## Notes", ""]
    lines += [f"- {' '.join(n.split())}" for n in notes] or ["- none"]
    return "\n".join(lines) + "\n"


def _redis_facts(peers: dict[str, dict[str, Any]]) -> str:
    for data in peers.values():
        for case in (data.get("cases") or {}).values():
            settings = case.get("server") or {}
            if "redis_version" in settings:
                persistence = settings.get("redis_persistence") or {}
                return (
                    f"{settings['redis_version']}, appendonly={persistence.get('appendonly')!s}, "
                    f"save={persistence.get('save')!r}"
                )
    return ""
