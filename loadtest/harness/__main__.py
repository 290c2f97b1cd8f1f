"""``python -m harness poll-health|swarm|dataset ...`` (from loadtest/): the client processes."""

import sys

from .probes import main

sys.exit(main())
