"""``python -m medcam3d ...`` (also what torchrun runs: ``torchrun ... -m medcam3d explain ...``)."""

import sys

from medcam3d.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
