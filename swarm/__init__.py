"""The node side: HTTP origin, transports, the mount process and the CLI.

Transports (HTTP origin now, peers later) implement
:class:`cvmfs_like.objects.ObjectSource` for content and python-tuf's
``FetcherInterface`` for metadata; nothing here knows catalog internals.
"""
