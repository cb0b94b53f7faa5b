"""Fixtures for the bench tests live in bench_harness.py, which the tests also import helpers from
(a module named `conftest` would clash with the other test folders' conftest files)."""

from bench_harness import fake_server  # noqa: F401
