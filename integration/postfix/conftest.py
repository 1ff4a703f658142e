"""Shared fixtures for the Postfix end-to-end tests.

Postfix missing is a failure, never a skip: the suite exists to prove the
product against a real Postfix, and install-deps.sh installs it.
"""

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pfx  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def postfix_present():
    pfx.require_postfix()


@pytest.fixture(scope="session")
def loopback():
    """Distinct 127.x.y.z addresses for this test run."""
    return pfx.Loopback()


@pytest.fixture
def sockdir():
    """A directory the postfix user can traverse, for socketmap unix sockets.

    pytest's tmp_path is mode 0700 under a 0700 parent: Postfix's smtp and
    trivial-rewrite processes (user postfix) could not reach a socket there,
    and each lookup would fail with a warning instead of a query.
    """
    path = tempfile.mkdtemp(prefix="pfx-sock-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
