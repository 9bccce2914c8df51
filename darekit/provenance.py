"""What every run directory records about the software that produced it."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import platform
import subprocess

from darekit import __version__
from darekit.paths import ROOT

# Distribution names; the backend (TensorFlow or JAX) is recorded by the seam, from its
# modules, whichever wheel provided them.
PACKAGES = ("numpy", "keras", "foolbox", "eagerpy", "adversarial-robustness-toolbox", "scipy",
            "h5py")


def package_versions() -> dict[str, str]:
    """Python, darekit, the Keras backend (``backend``: its name; its packages' versions, from
    ``darekit.backend.versions``) and the installed ``PACKAGES``."""
    from darekit import backend as B

    out = {"python": platform.python_version(), "darekit": __version__, **B.versions()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """``HEAD`` of the repository, with ``-dirty`` when the tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def provenance() -> dict:
    """Versions, git commit, host and time: stored beside every config."""
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
