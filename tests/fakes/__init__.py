"""Fake servers and fault injectors that speak real cloud wire formats, for tests."""
