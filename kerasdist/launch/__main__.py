"""`python -m kerasdist.launch`: same as the `kerasdist-run` command."""

import sys

from kerasdist.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
