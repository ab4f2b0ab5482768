"""``python -m swarm``: the same as the ``swarm`` command."""

import sys

from swarm.cli import main

sys.exit(main())
