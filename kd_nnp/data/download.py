"""Streamed downloads with progress, resume and size/checksum verification.

Works with ``http(s)://`` and ``file://`` URLs (the latter is how the code is tested offline).
A download goes to ``DEST.part`` and is renamed only once size and checksum match, so a
killed download never leaves a truncated file under the final name; an HTTP download that
was interrupted is resumed with a ``Range`` request when the server supports it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kd_nnp.errors import KdNnpError

CHUNK = 1 << 20


class DownloadError(KdNnpError, RuntimeError):
    """A download failed or its size/checksum did not match."""


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch_json(url: str, timeout: float = 60) -> Any:
    """GET a small JSON document (e.g. a figshare API record)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"could not fetch JSON from {url}: {exc}") from exc


def download_file(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    overwrite: bool = False,
) -> Path:
    """Stream ``url`` to ``dest``; verify ``expected_size`` (bytes) and ``md5`` when given.

    An existing ``dest`` that passes the checks is kept (no download). Raises
    :class:`DownloadError` naming the URL and what did not match.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        _verify(dest, url, expected_size, md5)
        return dest
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    if expected_size is not None and start > expected_size:
        part.unlink()
        start = 0
    req = urllib.request.Request(url, headers={"User-Agent": "kd_nnp"})
    if start and url.startswith(("http://", "https://")):
        req.add_header("Range", f"bytes={start}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"download of {url} failed: {exc}") from exc
    with resp:
        resumed = start > 0 and getattr(resp, "status", None) == 206
        if not resumed:
            start = 0
        length = resp.headers.get("Content-Length")
        total = expected_size or ((int(length) + start) if length else None)
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            disable=not progress,
        )
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    bar.update(len(block))
        except OSError as exc:
            raise DownloadError(
                f"download of {url} interrupted after {part.stat().st_size} bytes "
                f"({exc}); rerun to resume"
            ) from exc
        finally:
            bar.close()
    try:
        _verify(part, url, expected_size, md5)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def _verify(path: Path, url: str, expected_size: int | None, md5: str | None) -> None:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DownloadError(
            f"{path}: size {size} bytes does not match the expected {expected_size} (from {url})"
        )
    if md5 is not None:
        got = file_digest(path, "md5")
        if got.lower() != md5.lower():
            raise DownloadError(f"{path}: md5 {got} does not match the expected {md5} (from {url})")
