"""``python -m lungcore`` is the ``lungcore`` command."""
import sys

from lungcore.cli import main

sys.exit(main())
