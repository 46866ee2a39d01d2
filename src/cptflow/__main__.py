"""``python -m cptflow`` is the ``cptflow`` command (see ``cptflow.command``)."""

import sys

from cptflow.command import main

if __name__ == "__main__":
    sys.exit(main())
