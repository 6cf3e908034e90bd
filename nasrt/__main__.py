import sys

from nasrt.cli import main

sys.exit(main())
