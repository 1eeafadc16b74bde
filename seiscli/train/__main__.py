import sys

from seiscli.train.entry import main

sys.exit(main())
