import sys

from solm_compile.cli import main

sys.exit(main())
