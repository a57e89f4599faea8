"""The server's database as open_db opens it (its cache, its packs), and its open files."""
from __future__ import annotations

import resource

import pytest
import transaction

from dsage.server.service import CACHE_BYTES, CACHE_OBJECTS, open_db, raise_open_files


def test_the_cache_is_the_servers_unless_the_uri_names_one(tmp_path):
    """zodburi gives every URI a cache of 10,000 objects, which made the server reload jobs
    from the file under load; a URI's own connection_cache_size still wins."""
    db = open_db(f"file://{tmp_path}/a.fs")
    try:
        assert (db.getCacheSize(), db.getCacheSizeBytes()) == (CACHE_OBJECTS, CACHE_BYTES) == (100_000, 256 << 20)
    finally:
        db.close()
    db = open_db(f"file://{tmp_path}/b.fs?connection_cache_size=500&connection_cache_size_bytes=10MB")
    try:
        assert (db.getCacheSize(), db.getCacheSizeBytes()) == (500, 10 << 20)
    finally:
        db.close()


def test_a_uri_with_an_unknown_parameter_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="bad database URI .*cache_size"):
        open_db(f"file://{tmp_path}/c.fs?cache_size=500")


def test_a_pack_keeps_no_copy_of_the_file_of_before(tmp_path):
    """A pack leaves dsage.fs and its index, not dsage.fs.old beside them (twice the disk)."""
    db = open_db(f"file://{tmp_path}/dsage.fs?blobstorage_dir={tmp_path}/blobs")
    try:
        conn = db.open()
        for i in range(20):
            conn.root()["x"] = "y" * 10_000 + str(i)
            transaction.commit()
        conn.close()
        before = db.getSize()
        db.pack()
        assert db.getSize() < before / 10
    finally:
        db.close()
    assert not (tmp_path / "dsage.fs.old").exists()
    assert (tmp_path / "dsage.fs").exists() and (tmp_path / "dsage.fs.index").exists()


@pytest.mark.parametrize("soft, hard, expected", [
    (1024, 20_000, (5_256, (5_256, 20_000))),       # raised to what 5,000 connections need
    (1024, 3_000, (3_000, (3_000, 3_000))),          # as far as the hard limit allows
    (65_536, 65_536, (65_536, None)),                # already enough: left alone
])
def test_the_open_files_limit_is_raised_for_the_connections(monkeypatch, soft, hard, expected):
    now = {}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: now.update(limits=limits))
    assert raise_open_files(5_000) == (expected[0], 5_256)
    assert now.get("limits") == expected[1]
