"""``modelserve``: the command-line client of the REST API, for people and CI (README "Command line").

It speaks HTTP to ``/api/v1/`` only and imports nothing of the product (import-linter checks it), so
what it can do is exactly what any other API client can do.
"""
