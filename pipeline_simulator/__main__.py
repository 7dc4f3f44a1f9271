"""``python -m pipeline_simulator [--port N] ...``: serve the simulator without the main CLI."""

import sys

from .cli import main

sys.exit(main())
