"""Backends and everything about one backend: its facts, health verdict and probes, circuit
breaker, and the upstream connection (exchange, strict response head, failure table,
SSRF guard).
"""
