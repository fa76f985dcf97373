"""The compose stack, checked without a Docker engine: files parse, everything referenced exists,
services have the shape `docker compose up --scale` needs, Prometheus finds the metrics ports, and
every SQL query of the Grafana dashboard runs as the provisioned read-only role against a migrated
database and returns the columns its panel expects."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support import REPO, SCHEMA, jobq_cli

from jobqueue import registry

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
DATASOURCES = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/jobq.yaml").read_text())
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/jobq.json").read_text())

# Panel title -> the columns it is built for (the table panels show them in this order).
EXPECTED: dict[str, list[str]] = {
    "Runnable tasks": ["value"],
    "Oldest wait": ["value"],
    "Running": ["value"],
    "Alive workers": ["value"],
    "Stale workers": ["value"],
    "Expired leases": ["value"],
    "Queue depth": [
        "type",
        "runnable",
        "scheduled",
        "waiting",
        "running",
        "oldest_wait_seconds",
        "done_last_hour",
        "failed_last_hour",
        "paused",
    ],
    "Throughput (finished per minute)": ["time", "metric", "finished"],
    "Failures and retries per minute": ["time", "failed", "retried", "cancelled"],
    "Latency percentiles (last hour)": [
        "type",
        "tasks",
        "wait_p50",
        "wait_p95",
        "wait_p99",
        "run_p50",
        "run_p95",
        "run_p99",
    ],
    "Latency percentiles (5 minutes)": [
        "type",
        "tasks",
        "wait_p50",
        "wait_p95",
        "wait_p99",
        "run_p50",
        "run_p95",
        "run_p99",
    ],
    "Workers": [
        "worker_id",
        "host",
        "pid",
        "types",
        "state",
        "heartbeat_age_seconds",
        "running",
        "done",
        "failed",
        "lease_expired",
    ],
    "Failing types (24 hours)": [
        "type",
        "error",
        "failed",
        "retried",
        "last_seen",
        "latest_task_id",
        "latest_message",
    ],
    "Documents": [
        "doc_id",
        "name",
        "status",
        "progress",
        "tasks",
        "done",
        "failed",
        "chunks",
        "queue_position",
        "created_at",
    ],
    "Batches": ["batch_id", "owner", "created_at", "files", "processed", "succeeded", "failed", "progress"],
}


def panels() -> list[dict[str, Any]]:
    return list(DASHBOARD["panels"])


def for_schema(sql: str) -> str:
    """A dashboard query as it would read for the schema under test.

    The deployed stack (compose.yaml) runs jobq in its default schema, so the dashboard legitimately
    names `jobq.` views; under a non-default JOBQ_SCHEMA the test reads the same views in that schema.
    """
    return re.sub(r"\bjobq\.(?=[a-z_])", f"{SCHEMA}.", sql)


def host_paths(service: dict[str, Any]) -> list[Path]:
    out = []
    for v in service.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith("./"):
            out.append(REPO / src)
    return out


def command_of(name: str) -> list[str]:
    cmd = SERVICES[name].get("command", [])
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_services_and_their_shape() -> None:
    assert set(SERVICES) == {
        "postgres",
        "migrate",
        "worker-dataflow",
        "worker-raptor",
        "exporter",
        "prometheus",
        "grafana",
    }
    pg = SERVICES["postgres"]
    assert pg["image"].startswith("postgres:") and "healthcheck" in pg
    migrate = SERVICES["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "jobq migrate && jobq roles --password-from-env" in " ".join(migrate["entrypoint"])
    for name, ttype in (("worker-dataflow", "dataflow"), ("worker-raptor", "raptor")):
        svc, cmd = SERVICES[name], command_of(name)
        assert cmd[0] == "worker" and option(cmd, "--types") == ttype
        assert option(cmd, "--metrics-port") == "9100"
        # --scale needs replicas that do not collide: no fixed name, no published host port.
        assert "container_name" not in svc and "ports" not in svc
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "jobq_worker:" in svc["environment"]["JOBQ_DATABASE_URL"]
        registry.get_type(ttype)  # the image's workers can start: the type is installed
    assert "jobq_dashboard:" in SERVICES["exporter"]["environment"]["JOBQ_DATABASE_URL"]
    for name in ("migrate", "worker-dataflow", "worker-raptor", "exporter"):
        build = SERVICES[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).is_file()


def test_every_referenced_file_exists() -> None:
    for name, svc in SERVICES.items():
        for path in host_paths(svc):
            assert path.exists(), f"{name} mounts missing {path}"
    assert (REPO / "deploy/grafana/provisioning/dashboards/jobq.yaml").is_file()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                if "*" not in src:
                    assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r'^ENTRYPOINT \["jobq"\]$', (REPO / "Dockerfile").read_text(), re.M)


def test_prometheus_scrapes_the_metrics_ports() -> None:
    jobs = {j["job_name"]: j for j in PROMETHEUS["scrape_configs"]}
    for name in ("worker-dataflow", "worker-raptor"):
        sd = [c for j in jobs.values() for c in j.get("dns_sd_configs", []) if name in c["names"]]
        assert len(sd) == 1, name
        assert sd[0]["type"] == "A" and str(sd[0]["port"]) == option(command_of(name), "--metrics-port")
    targets = [t for j in jobs.values() for c in j.get("static_configs", []) for t in c["targets"]]
    assert targets == [f"exporter:{option(command_of('exporter'), '--port')}"]
    prom = SERVICES["prometheus"]
    assert any(v.endswith("/etc/prometheus/prometheus.yml:ro") for v in prom["volumes"])


def test_grafana_provisioning_matches_the_dashboard() -> None:
    ds = {d["uid"]: d for d in DATASOURCES["datasources"]}
    pg = ds["jobq-postgres"]
    assert pg["type"] == "grafana-postgresql-datasource" and pg["user"] == "jobq_dashboard"
    assert pg["secureJsonData"]["password"] == "${JOBQ_DASHBOARD_PASSWORD}"
    assert "JOBQ_DASHBOARD_PASSWORD" in SERVICES["grafana"]["environment"]
    assert (
        pg["url"] == "postgres:5432"
        and pg["jsonData"]["database"] == SERVICES["postgres"]["environment"]["POSTGRES_DB"]
    )
    titles = [p["title"] for p in panels()]
    assert sorted(titles) == sorted(EXPECTED), "every panel needs its expected columns here"
    for p in panels():
        assert p["datasource"]["uid"] == "jobq-postgres"
        assert all(t["datasource"]["uid"] == "jobq-postgres" and t["rawSql"].strip() for t in p["targets"])
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.endswith("/jobq.json")


@pytest.fixture(scope="module")
def dashboard_db(db_url: str) -> str:
    assert jobq_cli("roles").returncode == 0
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("""
            INSERT INTO tasks (type, status, run_at) SELECT 'g_a', 'queued', now() - interval '1 minute'
            FROM generate_series(1, 3);
            INSERT INTO tasks (type, status, run_at, started_at, finished_at, process_duration,
                                    last_error)
            SELECT 'g_b', CASE WHEN i % 4 = 0 THEN 'failed' ELSE 'done' END, now() - interval '5 s',
                   now() - interval '4 s', now() - i * interval '20 seconds', 1.5,
                   CASE WHEN i % 4 = 0 THEN 'ValueError: nope' END
            FROM generate_series(1, 20) i;
            INSERT INTO workers (id, host, pid, types, concurrency) VALUES ('g-w', 'h', 1, '{g_a}', 2);
            INSERT INTO batches (owner, requested) VALUES ('me', 1);
            INSERT INTO documents (batch_id, name, size, format, kind, parser, pages, content_digest,
                                        content)
            VALUES (1, 'a.txt', 2, 'txt', 'text', 'general', 1, 'dg', 'hi');
            INSERT INTO tasks (type, status, doc_id, batch_id, finished_at)
            VALUES ('g_b', 'done', 1, 1, now());
        """)
    return db_url


@pytest.mark.parametrize("title", list(EXPECTED))
def test_dashboard_query_runs_as_the_dashboard_role(dashboard_db: str, title: str) -> None:
    panel = next(p for p in panels() if p["title"] == title)
    with psycopg.connect(dashboard_db, autocommit=True) as c:
        # `jobq roles` names the roles after the schema by default (jobq_dashboard in the stack).
        c.execute(f"SET ROLE {SCHEMA}_dashboard")
        for target in panel["targets"]:
            cur = c.execute(for_schema(target["rawSql"]))
            assert cur.description is not None
            cols = [d.name for d in cur.description]
            data = cur.fetchall()
            assert cols == EXPECTED[title]
            assert data, f"{title}: no rows on a history that has some"
            if target["format"] == "time_series":
                assert cur.description[0].type_code == psycopg.adapters.types["timestamptz"].oid
                times = [r[0] for r in data]
                assert times == sorted(times), "Grafana wants time series ordered by time"
            if panel["type"] == "stat":
                assert len(data) == 1 and float(data[0][0]) >= 0
