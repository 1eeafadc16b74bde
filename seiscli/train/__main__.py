import os
import sys

from seiscli.train.entry import main

code = main()
# Leave without running destructors: after its peers have exited, freeing a gloo process group still held
# by DDP's reducer can block forever joining its worker threads (seen under srun: the job never ended).
# Everything the run writes is closed by now; only the standard streams need flushing.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
