import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

# The suite's problems are tiny: with several threads, thread hand-offs cost more than the
# arithmetic (and a busy machine makes them much slower); tests that need more set it.
torch.set_num_threads(1)
