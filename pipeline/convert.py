"""``python -m pipeline.convert``: the model converter's command (``pipeline.tools.convert``)."""

import sys

from .tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
