"""Dataset loaders that work offline. Every loader returns a :class:`Splits` of TensorDatasets.

* :func:`make_spirals` / :func:`spirals`: the 2-armed 720-degree spirals of the learnt-depth paper
  (seed 000, section 3.1), generated from a seed; nothing is downloaded.
* :func:`load_images`: Fashion-MNIST from the Debian package's idx files when they are installed,
  else scikit-learn's 8x8 digits (shipped inside scikit-learn); ``Splits.source`` says which.
"""

from bnas_fast.data.common import Splits
from bnas_fast.data.images import FASHION_MNIST_DIR, load_digits, load_fashion_mnist, load_images, read_idx
from bnas_fast.data.spirals import make_spirals, spirals

__all__ = [
    "Splits",
    "make_spirals",
    "spirals",
    "load_images",
    "load_fashion_mnist",
    "load_digits",
    "read_idx",
    "FASHION_MNIST_DIR",
]
