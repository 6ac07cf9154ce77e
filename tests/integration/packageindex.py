"""A tiny package index the test upstream serves: one wheel for pip, one tarball for npm.

pip reads a PEP 503 simple index (``/simple/nj-demo/``) and downloads the wheel it links;
npm reads the package document (``/nj-demo``) and downloads its ``dist.tarball``. Both are
built in memory, with the hashes the clients check.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile

WHEEL = "nj_demo-1.0-py3-none-any.whl"
TARBALL = "nj-demo-1.0.0.tgz"


def _wheel() -> bytes:
    files = {
        "nj_demo/__init__.py": b"VALUE = 42\n",
        "nj_demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: nj-demo\nVersion: 1.0\n",
        "nj_demo-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: netjail-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    )
    files["nj_demo-1.0.dist-info/RECORD"] = (record + "nj_demo-1.0.dist-info/RECORD,,\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def _tarball() -> bytes:
    files = {
        "package/package.json": json.dumps({"name": "nj-demo", "version": "1.0.0"}).encode(),
        "package/index.js": b"module.exports = 42;\n",
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


WHEEL_BYTES = _wheel()
TARBALL_BYTES = _tarball()


def index_response(path: str, host: str) -> tuple[bytes, str] | None:
    """The body and content type the index serves at ``path``, or None if it has none."""
    if path == "/simple/nj-demo/":
        digest = hashlib.sha256(WHEEL_BYTES).hexdigest()
        link = f'<a href="/files/{WHEEL}#sha256={digest}">{WHEEL}</a>'
        return f"<!DOCTYPE html><html><body>{link}</body></html>".encode(), "text/html"
    if path == f"/files/{WHEEL}":
        return WHEEL_BYTES, "application/octet-stream"
    if path == "/nj-demo":
        integrity = base64.b64encode(hashlib.sha512(TARBALL_BYTES).digest()).decode()
        version = {
            "name": "nj-demo",
            "version": "1.0.0",
            "dist": {
                "tarball": f"https://{host}/nj-demo/-/{TARBALL}",
                "shasum": hashlib.sha1(TARBALL_BYTES).hexdigest(),  # noqa: S324 - npm's own field
                "integrity": f"sha512-{integrity}",
            },
        }
        document = {
            "name": "nj-demo",
            "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": version},
        }
        return json.dumps(document).encode(), "application/json"
    if path == f"/nj-demo/-/{TARBALL}":
        return TARBALL_BYTES, "application/octet-stream"
    return None
