"""Server addresses as users type them."""
from __future__ import annotations

import pytest

from dsage.config import ServerConfig, check_server_config, masked, split_address


def test_addresses_split_into_host_and_port():
    """HOST:PORT, a bare host (the default port) and a bracketed IPv6 address."""
    assert split_address("lab1.example.edu:9000") == ("lab1.example.edu", 9000)
    assert split_address("lab1") == ("lab1", 8081)
    assert split_address("[::1]:8081") == ("::1", 8081)


@pytest.mark.parametrize("bad, why", [("lab1:http", "expected HOST:PORT"), ("lab1:99999", "from 1 to 65535"),
                                      ("lab1:-1", "from 1 to 65535")])
def test_bad_addresses_say_what_is_wrong(bad, why):
    with pytest.raises(ValueError, match=why):
        split_address(bad)


@pytest.mark.parametrize("uri, shown", [
    ("postgres://dsage:s3:cr@et@db.example.edu:5432/dsage?connect_timeout=5",
     "postgres://dsage:***@db.example.edu:5432/dsage?connect_timeout=5"),
    ("postgres://dsage:secret@db/dsage", "postgres://dsage:***@db/dsage"),
    ("postgres://dsage@db/dsage", "postgres://dsage@db/dsage"),
    ("zeo://zodb:8100?blob_dir=/var/cache/b", "zeo://zodb:8100?blob_dir=/var/cache/b"),
    ("file:///srv/dsage/dsage.fs?blobstorage_dir=/srv/b", "file:///srv/dsage/dsage.fs?blobstorage_dir=/srv/b"),
])
def test_a_storage_uri_is_shown_without_its_password(uri, shown):
    assert masked(uri) == shown


def test_a_hold_of_no_time_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hold_seconds must be more than 0, not 0"):
        check_server_config(ServerConfig(home=tmp_path, hold_seconds=0), keys=False)
    check_server_config(ServerConfig(home=tmp_path, hold_seconds=0.5), keys=False)
