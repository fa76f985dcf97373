"""PNGs next to the benchmark's JSON results (matplotlib, the ``[bench]`` extra).

From ``results.json`` (``python -m bench run``): ``throughput.png``, jobs/s by scenario and peer, and
``latency_cdf.png``, the CDF of enqueue -> handler start per peer (from the raw samples the drivers
report). From ``sweep.json`` (``python -m bench sweep``): ``sweep.png``, jobs/s against concurrency,
one line per worker-process count, with the 80 %-of-best line. From ``soak.json`` (``python -m
bench.history --soak-minutes M --out DIR``): ``soak.png``, throughput, claim p99 and dead tuples over time.

    python -m bench plots bench/results
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

DPI = 80  # small files: docs/benchmarks.md embeds them
# The bars' labels (the table's row titles are too long to sit side by side under them).
THROUGHPUT_LABELS = {
    "enqueue_single": "enqueue\none by one",
    "enqueue_concurrent": "enqueue from\n64 coroutines",
    "enqueue_batch": "enqueue\nbatch API",
    "drain_1p_default": "drain, 1 process\ndefaults",
    "drain_1p_tuned": "drain, 1 process\ntuned",
    "drain_2p_default": "drain, 2 processes\ndefaults",
    "drain_2p_tuned": "drain, 2 processes\ntuned",
}


def draw(directory: Path) -> list[Path]:
    """Every plot the results in `directory` allow; returns the files written."""
    written: list[Path] = []
    results = directory / "results.json"
    if results.exists():
        doc = json.loads(results.read_text())
        written += [throughput(doc, directory / "throughput.png"), latency_cdf(doc, directory / "latency_cdf.png")]
    sweep_file = directory / "sweep.json"
    if sweep_file.exists():
        written.append(sweep(json.loads(sweep_file.read_text()), directory / "sweep.png"))
    soak_file = directory / "soak.json"
    if soak_file.exists():
        written.append(soak(json.loads(soak_file.read_text()), directory / "soak.png"))
    for path in written:
        print(f"wrote {path}")
    return written


def _peers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p: d for p, d in doc["peers"].items() if not d.get("skipped")}


def throughput(doc: dict[str, Any], out: Path) -> Path:
    peers = _peers(doc)
    keys = [k for k in THROUGHPUT_LABELS if k in doc["cases"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(peers))
    for i, (peer, data) in enumerate(peers.items()):
        values = [((data.get("cases") or {}).get(k) or {}).get("median", {}).get("jobs_per_s", 0.0) for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], values, width, label=peer)
    ax.set_xticks([x + width * (len(peers) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels([THROUGHPUT_LABELS[k] for k in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("jobs/s (log scale)")
    ax.set_title(f"Throughput by scenario and peer ({doc['profile']} profile, {doc['date'][:10]})")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def latency_cdf(doc: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for peer, data in _peers(doc).items():
        case = (data.get("cases") or {}).get("latency") or {}
        samples = sorted(x for run in case.get("runs") or [] if run.get("ok")
                         for x in (run.get("metric") or {}).get("raw_ms", []))
        if samples:
            ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=peer)
    ax.set_xscale("log")
    ax.set_xlabel("enqueue -> handler start (ms, log scale)")
    ax.set_ylabel("fraction of tasks")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def sweep(doc: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in sorted({q["processes"] for q in doc["points"]}):
        pts = sorted((q["concurrency"], q["jobs_per_s"]) for q in doc["points"]
                     if q["processes"] == p and "jobs_per_s" in q)
        ax.plot([c for c, _ in pts], [r for _, r in pts], marker="o", label=f"{p} process{'es' if p > 1 else ''}")
    best = doc["best_jobs_per_s"]
    ax.axhline(0.8 * best, color="grey", linestyle="--", linewidth=1, label="80% of best")
    mass = doc.get("mass_cancel") or {}
    if mass.get("jobs_per_s"):
        ax.plot([mass["concurrency"]], [mass["jobs_per_s"]], marker="x", color="black", linestyle="none",
                label=f"after cancelling {mass['cancelled_first']:,}")
    ax.set_xscale("log")
    ax.set_xlabel("concurrency per process (log scale)")
    ax.set_ylabel("jobs/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"jobq drain of {doc['n']:,} no-op tasks ({doc['date'][:10]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def soak(doc: dict[str, Any], out: Path) -> Path:
    """Throughput, claim p99 and dead tuples over the soak, the xmin hold shaded."""
    samples = doc["soak"]
    minutes = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    panels = (("jobs_per_s", "jobs/s"), ("claim_p99_ms", "claim p99 (ms)"), ("dead_tuples", "dead tuples"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(minutes, [s[key] for s in samples], marker=".", linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if doc.get("hold_xmin_minutes"):
            ax.axvspan(0, doc["hold_xmin_minutes"], color="orange", alpha=0.15,
                       label="xmin held" if key == "jobs_per_s" else None)
    if doc.get("hold_xmin_minutes"):
        axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("minutes")
    axes[0].set_title(f"Soak: {doc['rate']:,} tasks/s enqueued, PostgreSQL {doc['server'].split()[0]} "
                      f"({doc['date'][:10]})", fontsize=9)
    return _save(fig, out)


def _save(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
