"""Certificates made at test time (the `cryptography` package): a CA and leaf certificates it signs,
written as PEM files. EC P-256 keys: fast to make, and what cert-manager would issue on request.

Leaves carry both serverAuth and clientAuth usages, as the services' certificates do (one per
service: it serves its port and is its client certificate on the links it opens), and the SANs
the tests dial (localhost, 127.0.0.1) plus any extra names.
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))


class CertificateAuthority:
    """A self-signed CA in `folder`/`name`-ca.pem; `issue` writes leaves it signs."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        builder = _validity(x509.CertificateBuilder().subject_name(_name(f"{name} CA")).issuer_name(_name(f"{name} CA"))
                            .public_key(self.key.public_key()).serial_number(x509.random_serial_number()))
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True))
        self.certificate = builder.sign(self.key, hashes.SHA256())
        self.cert = folder / f"{name}-ca.pem"
        self.cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, dns_names: tuple[str, ...] = ()) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost"), *map(x509.DNSName, dns_names),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = _validity(x509.CertificateBuilder().subject_name(_name(common_name))
                            .issuer_name(self.certificate.subject).public_key(key.public_key())
                            .serial_number(x509.random_serial_number()))
        builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        leaf = Leaf(self.folder / f"{self.name}-{common_name}.pem", self.folder / f"{self.name}-{common_name}-key.pem")
        leaf.cert.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        _write_key(key, leaf.key)
        return leaf
