"""Local servers that speak cloud APIs (GCE, EC2 faults, ARM) to the real client libraries in tests."""
