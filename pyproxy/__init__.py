"""pyproxy: a threaded HTTP/1.1 reverse proxy and load balancer you can read."""

__version__ = "0.1.0"
