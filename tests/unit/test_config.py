"""Server addresses as users type them."""
from __future__ import annotations

import pytest

from dsage.config import split_address


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
