"""YAML -> Config: the schema (frozen dataclasses with every default), units, field
checkers, loading, reports. Imports nothing else of pyproxy.
"""
