"""Test certificates made with the ``openssl`` command (self-signed, loopback names)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def make_cert(cert_out: Path, key_out: Path, common_name: str,
              ca_out: Path | None = None) -> None:
    """A self-signed P-256 certificate for localhost/127.0.0.1 (also copied to ``ca_out``
    for clients to trust). The key is written first, then the certificate, as a rotation
    would do it."""
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = Path(tmp) / "k.pem", Path(tmp) / "c.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", f"/CN={common_name}",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60)
        shutil.copyfile(key, key_out)
        shutil.copyfile(cert, cert_out)
        if ca_out is not None:
            shutil.copyfile(cert, ca_out)
