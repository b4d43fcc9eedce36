import sys

from efficientad.cli import main

sys.exit(main())
