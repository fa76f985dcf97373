-- One job per transaction (pgbench autocommit: one commit per job).
INSERT INTO t (payload) VALUES (jsonb_build_object('i', :client_id::int));
