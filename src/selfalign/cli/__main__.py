"""``python -m selfalign.cli``: the same as the ``selfalign`` command."""

import sys

from selfalign.cli.app import app

sys.exit(app())
