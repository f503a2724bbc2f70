import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# One intra-op thread: the tests' problems are small, and on a shared 2-core machine a second
# OpenMP thread mostly waits at barriers for a descheduled core (seconds-long stalls).
torch.set_num_threads(1)
