"""The test process cannot bind a wildcard address (tests/loopback_guard.py), and loopback is
not affected."""

from __future__ import annotations

import socket

import pytest

from tests import loopback_guard


@pytest.mark.parametrize(
    ("family", "host"),
    [
        (socket.AF_INET, "0.0.0.0"),  # refused, never bound
        (socket.AF_INET, ""),
        (socket.AF_INET6, "::"),
        (socket.AF_INET6, "0:0::0"),
    ],
)
def test_a_wildcard_bind_is_refused_before_it_happens(family: int, host: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(loopback_guard.WildcardBind, match=r"127\.0\.0\.1"):
            sock.bind((host, 0))
        assert sock.getsockname()[1] == 0  # nothing was bound
    refused = loopback_guard.take()  # taken here, so the autouse check passes this test
    assert len(refused) == 1 and "bind to" in refused[0]


def test_a_datagram_from_an_unbound_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(loopback_guard.WildcardBind):
            sock.sendto(b"x", ("127.0.0.1", 9))
        assert sock.getsockname()[1] == 0  # the kernel did not bind it
        # The control: bound to loopback first, the same send goes out.
        sock.bind(("127.0.0.1", 0))
        assert sock.sendto(b"x", ("127.0.0.1", 9)) == 1
    assert len(loopback_guard.take()) == 1


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_loopback_binds_and_listens(family: int, host: str) -> None:
    with socket.create_server((host, 0), family=family) as server:
        port = server.getsockname()[1]
        with socket.create_connection((host, port), timeout=5):
            pass
    assert loopback_guard.take() == []


def test_a_caught_refusal_still_fails_the_test() -> None:
    """Code that swallows the error does not hide it: the check after each test fails it."""
    with socket.socket() as sock:
        try:
            sock.bind(("", 0))
        except Exception:  # what careless code under test might do
            pass
    with pytest.raises(pytest.fail.Exception, match="refused a wildcard bind"):
        loopback_guard.fail_if_refused()
    loopback_guard.fail_if_refused()  # the control: taken, nothing is left to fail on
