"""Local stand-ins for cloud APIs that have no usable emulator, spoken to by
the real client libraries in tests."""
