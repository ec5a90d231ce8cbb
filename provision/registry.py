"""Registry (cnr) node packs fetched at an exact version from the Comfy registry API.

ComfyUI-Manager and comfy-cli both resolve ``GET {registry}/nodes/{id}/install?version={v}`` to
a JSON answer whose ``downloadUrl`` is a zip of the pack. Doing that here, with the standard
library, means the restore needs neither ComfyUI-Manager (which is removed after the restore)
nor a running ComfyUI, and a test can stand a local server in for the registry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Protocol

DEFAULT_REGISTRY_URL = "https://api.comfy.org"


class RegistryError(Exception):
    """A pack that could not be fetched; the message says which and why."""


class PackFetcher(Protocol):
    """Puts the files of registry pack ``node_id`` at ``version`` into ``target`` (replacing it).

    Injectable so the restore can be tested, or pointed at another source, without the network.
    """

    def fetch(self, node_id: str, version: str, target: Path) -> None: ...


def _safe_extract(archive: zipfile.ZipFile, into: Path) -> None:
    """Extract, refusing any member that would land outside ``into``."""
    root = into.resolve()
    for member in archive.infolist():
        destination = (into / member.filename).resolve()
        if destination != root and root not in destination.parents:
            raise RegistryError(f"archive member {member.filename!r} escapes the pack folder")
    archive.extractall(into)


class RegistryClient:
    def __init__(self, base_url: str = DEFAULT_REGISTRY_URL, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": "comfys3-provision"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as error:
            raise RegistryError(f"{url} answered HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RegistryError(f"cannot reach {url}: {reason}") from None

    def download_url(self, node_id: str, version: str) -> str:
        query = urllib.parse.urlencode({"version": version})
        url = f"{self.base_url}/nodes/{urllib.parse.quote(node_id, safe='')}/install?{query}"
        try:
            answer = json.loads(self._get(url))
        except json.JSONDecodeError:
            raise RegistryError(f"{url} did not answer JSON") from None
        if not isinstance(answer, dict) or not answer.get("downloadUrl"):
            raise RegistryError(f"{url} gave no downloadUrl for {node_id}@{version}")
        # The registry answers an unknown version with another release; never install that.
        served = answer.get("version")
        if served is not None and str(served) != version:
            raise RegistryError(
                f"the registry has no version {version} of {node_id} (it offered {served})"
            )
        return str(answer["downloadUrl"])

    def fetch(self, node_id: str, version: str, target: Path) -> None:
        archive_url = self.download_url(node_id, version)
        payload = self._get(archive_url)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{node_id}-", dir=target.parent))
        try:
            archive_path = staging / "pack.zip"
            archive_path.write_bytes(payload)
            unpacked = staging / "pack"
            try:
                with zipfile.ZipFile(archive_path) as archive:
                    _safe_extract(archive, unpacked)
            except zipfile.BadZipFile:
                raise RegistryError(f"{archive_url} is not a zip archive") from None
            if target.exists():
                shutil.rmtree(target)
            unpacked.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
