def test_smoke(conn):
    assert conn.execute("SELECT count(*) FROM jobq.document_progress").fetchone()[0] == 0
