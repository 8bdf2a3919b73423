"""The ``bnas_fast`` operator namespace: one torch.library.Library that every op file defines into."""

import torch

LIB = torch.library.Library("bnas_fast", "DEF")
