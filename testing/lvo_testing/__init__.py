"""Helpers for tests, benchmarks and the demo: a local control plane, libvirtd and a guest image."""
