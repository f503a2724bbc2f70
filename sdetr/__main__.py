import sys

from sdetr.cli import main

sys.exit(main())
