"""`manage.py start --addr`: an address it cannot serve on is one line naming it."""

from __future__ import annotations

import pytest

from tests.conftest import run_manage


@pytest.mark.parametrize(
    ("addr", "said"),
    [
        ("127.0.0.1:99999", "--addr 127.0.0.1:99999: the port must be 1 to 65535"),
        ("127.0.0.1:-1", "--addr 127.0.0.1:-1: the port must be 1 to 65535"),
        ("127.0.0.1:0", "--addr 127.0.0.1:0: the port must be 1 to 65535"),
        ("999.1.1.1:8000", "--addr 999.1.1.1:8000: no host '999.1.1.1' here ("),
        ("127.0.0.1:http", "--addr '127.0.0.1:http': give host:port, such as 127.0.0.1:8000"),
    ],
)
def test_an_address_that_is_none_is_named_without_a_traceback(process_env, addr, said):
    """A port past 65535 ended in bind()'s OverflowError; a host that is none was told
    to stop the other server there, or to try the next port."""
    start = run_manage(["start", "--addr", addr], process_env)
    assert start.returncode == 1
    assert "Traceback" not in start.stderr and len(start.stderr.strip().splitlines()) == 1
    assert said in start.stderr, start.stderr
    assert "another server" not in start.stderr and "password" not in start.stdout
