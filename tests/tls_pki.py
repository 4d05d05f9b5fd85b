"""A throw-away PKI for the receiver's TLS tests: a CA, a server and a client certificate it signed, a rogue client.

Made with the ``openssl`` command line (RSA 2048, valid two days), once per
test session (:func:`pki`).
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def server_tls(self, *, client_ca: bool = False, **extra: object) -> dict[str, object]:
        """The node's ``tls:`` section: the server certificate, and with ``client_ca`` client certificates required."""
        tls: dict[str, object] = {"cert": str(self.cert("server")), "key": str(self.key("server")), **extra}
        if client_ca:
            tls["client_ca"] = str(self.ca)
        return tls

    def client_context(self, name: str | None = "client") -> ssl.SSLContext:
        """A client's context trusting our CA, presenting ``name``'s certificate (``None``: none)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False  # the tests connect to 127.0.0.1; the server certificate names localhost
        if name is not None:
            ctx.load_cert_chain(str(self.cert(name)), str(self.key(name)))
        return ctx

    def storescu_args(self, name: str = "client") -> list[str]:
        """DCMTK ``storescu`` options for TLS with ``name``'s certificate, trusting our CA."""
        return ["+tls", str(self.key(name)), str(self.cert(name)), "-pw", "+cf", str(self.ca)]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed(folder: Path, name: str, usage: str) -> None:
    key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(folder / "ca.crt"), "-CAkey", str(folder / "ca.key"),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "ca.key"), "-out",
             str(folder / "ca.crt"), "-days", "2", "-subj", "/CN=segnode test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _signed(folder, "server", "serverAuth")
    _signed(folder, "client", "clientAuth")
    # a client certificate no CA of ours signed
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "rogue.key"), "-out",
             str(folder / "rogue.crt"), "-days", "2", "-subj", "/CN=rogue")
    return Pki(folder)
