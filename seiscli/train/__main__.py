import os
import sys

from seiscli.train.entry import main

code = main(leave=True)  # a run that got as far as training ends the process itself, inside train()
# Here only when it did not (a bad recipe, a failed rendezvous). Leave without running destructors all the
# same: after its peers have exited, freeing a gloo process group still held by DDP's reducer can block
# forever joining its worker threads (seen under srun: the job never ended).
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
