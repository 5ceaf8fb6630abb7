"""TLS on both front ends with a throwaway CA: a verified client is served, a plaintext
or unverified one is not; with --tls-client-ca only clients holding a certificate from
that CA get in (mutual TLS). Auth and TLS compose."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teacher_client import TeacherClient, TeacherServiceError
from tests.conftest import start_background_server

TOKEN = "tls-test-token"


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(name: str, issuer_key, issuer_name, *, ca: bool, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer_key or key, hashes.SHA256())
    return key, certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    out = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("test CA", None, None, ca=True, server=False)
    files = {"ca": ca}
    for role in ("server", "client"):
        key, cert = _issue(role, ca_key, ca.subject, ca=False, server=role == "server")
        files[role], files[f"{role}_key"] = cert, key
    paths = {}
    for name, value in files.items():
        paths[name] = out / f"{name}.pem"
        data = (
            _key_pem(value)
            if name.endswith("_key")
            else value.public_bytes(serialization.Encoding.PEM)
        )
        paths[name].write_bytes(data)
    return paths


def _server(tiny_model_dir, backend, pki, **extra):
    return start_background_server(
        tiny_model_dir,
        backend,
        max_wait_ms=2.0,
        http_port=0,
        tls_cert=str(pki["server"]),
        tls_key=str(pki["server_key"]),
        **extra,
    )


def test_tls_serves_verified_clients_on_both_front_ends(tiny_model_dir, backend, pki, sequences):
    server = _server(tiny_model_dir, backend, pki, auth_token=TOKEN)
    try:
        assert server.http_url.startswith("https://")
        with TeacherClient(server.address, timeout=30, token=TOKEN, tls_ca=str(pki["ca"])) as c:
            assert len(c.score(sequences, 1, top_k=3)) == len(sequences)
        with (
            TeacherClient(server.address, timeout=3, token=TOKEN) as plaintext,
            pytest.raises(TeacherServiceError),
        ):
            plaintext.info()  # a plaintext client cannot talk to a TLS port
        with (
            TeacherClient(server.address, timeout=3, token=TOKEN, tls=True) as unverified,
            pytest.raises(TeacherServiceError),
        ):
            unverified.info()  # the system roots do not know the test CA
        with TeacherClient(server.address, timeout=10, tls_ca=str(pki["ca"]), token="no") as c:
            with pytest.raises(TeacherServiceError) as refused:
                c.info()
            assert "bearer token" in refused.value.details  # auth still applies under TLS
        headers = {"Authorization": f"Bearer {TOKEN}"}
        trust = ssl.create_default_context(cafile=str(pki["ca"]))
        answer = httpx.get(f"{server.http_url}/v1/info", headers=headers, verify=trust)
        assert answer.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.http_url}/v1/info", headers=headers)  # unverified certificate
    finally:
        server.stop()


def test_mutual_tls_requires_a_client_certificate(tiny_model_dir, backend, pki, sequences):
    server = _server(tiny_model_dir, backend, pki, tls_client_ca=str(pki["ca"]))
    try:
        identity = dict(tls_ca=str(pki["ca"]), tls_cert=str(pki["client"]))
        identity["tls_key"] = str(pki["client_key"])
        with TeacherClient(server.address, timeout=30, **identity) as client:
            assert len(client.score(sequences, 1, top_k=3)) == len(sequences)
        with (
            TeacherClient(server.address, timeout=3, tls_ca=str(pki["ca"])) as anonymous,
            pytest.raises(TeacherServiceError),
        ):
            anonymous.info()
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        assert httpx.get(f"{server.http_url}/v1/info", verify=context).status_code == 200
        without_certificate = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{server.http_url}/v1/info", verify=without_certificate)
    finally:
        server.stop()


def test_tls_config_errors_name_the_flag(tiny_model_dir):
    from teacher_service.config import ServerConfig

    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        ServerConfig(model=str(tiny_model_dir), tls_cert="a.pem")
    with pytest.raises(ValueError, match="--tls-client-ca"):
        ServerConfig(model=str(tiny_model_dir), tls_client_ca="ca.pem")


def test_the_trainer_reaches_a_tls_service_with_a_token(
    tiny_model_dir, backend, pki, student_model_dir, tmp_path, monkeypatch
):
    """A short GKD run through TLS + bearer token, configured the way a
    user would: TLS files in the config, the token in the environment."""
    from student_trainer.train import train
    from tests.trainer_helpers import small_config

    server = _server(tiny_model_dir, backend, pki, auth_token=TOKEN)
    try:
        monkeypatch.setenv("TEACHER_AUTH_TOKEN", TOKEN)
        config = small_config(
            tmp_path,
            student_model_dir,
            f"teacher.address={server.address}",
            f"teacher.tls_ca={pki['ca']}",
            "optim.steps=2",
        )
        assert train(config).steps == 2
    finally:
        server.stop()


def test_health_command_speaks_mutual_tls(tiny_model_dir, backend, pki):
    """`teacher-service health` (the Docker HEALTHCHECK) against a TLS + client-CA server."""
    server = _server(tiny_model_dir, backend, pki, tls_client_ca=str(pki["ca"]))
    command = [sys.executable, "-m", "teacher_service", "health", "--address", server.address]
    command += ["--tls-ca", str(pki["ca"]), "--timeout", "5"]
    identity = ["--tls-cert", str(pki["client"]), "--tls-key", str(pki["client_key"])]
    try:
        served = subprocess.run(command + identity, capture_output=True, text=True, timeout=60)
        anonymous = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip().endswith("SERVING")
    assert anonymous.returncode == 1 and "cannot reach" in anonymous.stderr
