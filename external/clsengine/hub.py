"""Fetch a weights snapshot from a URL or a local path and verify its size and sha256."""
from __future__ import annotations

import hashlib
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


def is_url(location: str) -> bool:
    return urlparse(str(location)).scheme in ("http", "https", "ftp")


def fetch_snapshot(location: str, destination: str | os.PathLike, sha256: str | None = None,
                   size: int | None = None, timeout: float = 30.0) -> Path:
    """Download or copy `location` to `destination` (atomically) and check size and sha256.

    Raises OfflineError when a URL cannot be reached and UserError when the file is missing or
    its size or digest differ from what the template declares.
    """
    destination = Path(destination)
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
                source = Path(location).expanduser()
                if not source.is_file():
                    raise UserError(f"snapshot {source} does not exist")
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out)
        actual_size = tmp.stat().st_size
        if size is not None and actual_size != int(size):
            raise UserError(f"snapshot {location}: size {actual_size} bytes, expected {size}")
        if sha256:
            digest = sha256_of(tmp)
            if digest.lower() != sha256.lower():
                raise UserError(f"snapshot {location}: sha256 {digest}, expected {sha256}")
    return destination
