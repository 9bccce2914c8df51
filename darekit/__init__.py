"""darekit: a reproduction of DARE (Delta debugging Aided Robustness Enhancement, ASE 2022).

All logic lives in this package; the scripts under ``train/``, ``adv/`` and ``dare/`` are thin
entry points that mirror the original artifact's layout.
"""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) buries the progress bars; keep
# warnings and errors. Users can still override the variable.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
