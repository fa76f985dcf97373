-- Raw-SQL ceiling: the simplest durable job table a SKIP LOCKED queue needs.
DROP TABLE IF EXISTS t;
CREATE TABLE t (
    id         bigserial PRIMARY KEY,
    status     text        NOT NULL DEFAULT 'queued',
    priority   int         NOT NULL DEFAULT 0,
    payload    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    locked_at  timestamptz
);
CREATE INDEX t_claim_idx ON t (priority DESC, id) WHERE status = 'queued';
