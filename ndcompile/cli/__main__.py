"""``python -m ndcompile.cli``: the ``ndcompile`` command."""

import sys

from ndcompile.cli.main import main

sys.exit(main())
