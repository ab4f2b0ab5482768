"""Keys, signed metadata (TUF roles), verification and the site's trust policy.

The verification core takes bytes and returns verified objects; it performs no
network or disk I/O.  Publishing (`trust.repository`) and the node-side updater
(`trust.client`) own their disk state; transports are injected as python-tuf
``FetcherInterface`` implementations from the ``swarm`` package.
"""
