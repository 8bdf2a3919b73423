"""Test configuration shared by every test file.

No machine here has a GPU, so the Triton kernels run under Triton's interpreter on CPU tensors.
TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
