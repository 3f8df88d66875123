"""Test support shared by tests/ and tools/ (not public API)."""
