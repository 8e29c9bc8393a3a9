"""One checker module per reference-fixture layout (see tests/test_reference_fixtures.py).

A checker module defines ``FEATURE`` (a short description of what it checks) and
``check(fixture_dir: pathlib.Path) -> None`` which raises AssertionError on a mismatch.
"""
