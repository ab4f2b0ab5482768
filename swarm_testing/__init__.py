"""What tests/ and bench/ share, so that bench/ never imports tests/.

- :mod:`swarm_testing.netns`: network namespaces on one bridge, always removed;
- :mod:`swarm_testing.waiting`: :func:`~swarm_testing.waiting.eventually`, the one
  way a test waits for an event (polling with a deadline);
- :mod:`swarm_testing.bencode`: a minimal BEP 3 encoder written from the spec.
- :mod:`swarm_testing.broker`: a real NATS broker (token auth) on 127.0.0.1 and its
  site config.
- :mod:`swarm_testing.slurm`: a real single-host Slurm (munged, slurmctld, slurmd)
  from a throw-away config, always stopped.

Nothing here is used by the product packages.
"""
