"""One running instance: the Service that builds and owns everything, startup and graceful
shutdown.
"""
