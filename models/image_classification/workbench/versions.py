"""What code a run used: the engine's and the domain's versions and the repository commit, recorded in
config.yaml, every checkpoint (which holds the config) and metrics.yaml. A work dir pins its copy of the domain
(`workbench/`); the engine comes from the environment, so these are what tell two runs' code apart."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import clsengine

from . import __version__


def _git_commit(folder: Path) -> str | None:
    """The commit checked out where `folder` lives ("+changes" when files differ from it), or None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """{clsengine, workbench: versions; engine_commit: the commit of the engine's checkout (an editable
    install from this repository), None for a package installed from an archive}."""
    return {"clsengine": clsengine.__version__, "workbench": __version__,
            "engine_commit": _git_commit(Path(clsengine.__file__).resolve().parent)}


__all__ = ["versions"]
