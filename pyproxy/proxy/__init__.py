"""The WSGI app on the proxy listener: the request sequence, the admission of an attempt,
the attempt, the relay stream, pyproxy's own answers, the explain header.
"""
