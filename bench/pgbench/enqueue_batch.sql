-- 1000 jobs per transaction (matches the peers' batch size).
INSERT INTO t (payload) SELECT jsonb_build_object('i', g) FROM generate_series(1, 1000) AS g;
