"""The client-facing HTTP/1.1 server: waitress made strict (parser, chunked decoder, tasks)
with header and send deadlines and draining. Knows only the WSGI contract, never the
app.
"""
