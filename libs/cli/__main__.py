import sys

from libs.cli import main

sys.exit(main())
