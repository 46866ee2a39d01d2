"""Test helpers shared across test families (importable: tests/ is on the pytest pythonpath)."""
