"""Fixtures for the server tests live in server_harness.py, which the tests also import helpers from
(a module named `conftest` would clash with the other test folders' conftest files)."""

from server_harness import anyio_backend, client, server, state, tiny_dir  # noqa: F401
