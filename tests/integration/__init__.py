"""Integration tests (a package: its module names must not collide with tests/unit's, e.g. test_sweep)."""
