"""darekit: a reproduction of DARE (Delta debugging Aided Robustness Enhancement, ASE 2022).

All logic lives in this package; the scripts under ``train/``, ``adv/`` and ``dare/`` are thin
entry points that mirror the original artifact's layout.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN and CUDA notices, printed before
    its log settings apply) kept off stderr, so that a bad option's one-line error stays one
    line. Python exceptions still propagate. ``DAREKIT_TF_LOGS=1`` shows the chatter."""
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in _sys.modules or _os.environ.get("DAREKIT_TF_LOGS") == "1":
        return
    _sys.stderr.flush()
    saved = _os.dup(2)
    try:
        with open(_os.devnull, "w") as devnull:
            _os.dup2(devnull.fileno(), 2)
            import tensorflow
        # Python-side warnings too (retracing notices when each historical model of a run
        # gets its own compiled gradient function are expected, not a problem).
        tensorflow.get_logger().setLevel("ERROR")
    except ImportError:
        pass  # reported by the import that needs it, with stderr back in place
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)


_import_tensorflow_quietly()
