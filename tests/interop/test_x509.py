"""X.509 devices: the official SDKs against the local hub.

The registry side is azure-iot-hub's create_device_with_x509 (selfSigned, by thumbprint) and
create_device_with_certificate_authority; the certificates come from `simdevice service
certificate create-ca` / `issue` (the CLI, against the session's hub with --local); the device
side is azure-iot-device's IoTHubDeviceClient.create_from_x509_certificate with X509(cert_file,
key_file). Refusals (CONNACK 5) reach the SDK as CredentialError.
"""

import json
import os
import pathlib
import queue
import stat
import subprocess

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, X509
from azure.iot.device.exceptions import ClientError, CredentialError
from azure.iot.hub.models import CloudToDeviceMethod

from conftest import REPO_ROOT, call_with_timeout, unique_id, wait_for


def simdevice(hub, *args):
    """Runs `simdevice service ... --local --state-dir HUB` and returns its JSON answer."""
    binary = pathlib.Path(os.environ.get("SIMDEVICE_BIN", "target/debug/simdevice"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    env = {k: v for k, v in os.environ.items() if k not in ("IOTHUB_CONNECTION_STRING", "SIMDEVICE_HUB_STATE_DIR")}
    done = subprocess.run(
        [str(binary), "service", "--local", "--state-dir", str(hub.state_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, "simdevice service {} -> {}: {}".format(args, done.returncode, done.stderr)
    return json.loads(done.stdout)


@pytest.fixture
def certs(hub, tmp_path):
    """Issues device certificates through the CLI into tmp_path."""

    def issue(device_id, ca=None, days=30):
        signer = ["--ca", ca] if ca else ["--self-signed"]
        out = tmp_path / unique_id("pair")
        answer = simdevice(hub, "certificate", "issue", device_id, *signer, "--out", str(out), "--days", str(days))
        mode = stat.S_IMODE(os.stat(answer["keyFile"]).st_mode)
        assert mode == 0o600, "the key file must be private, got {:o}".format(mode)
        return answer

    return issue


@pytest.fixture
def x509_clients(hub):
    clients = []

    def make(device_id, issued):
        client = IoTHubDeviceClient.create_from_x509_certificate(
            X509(issued["certificateFile"], issued["keyFile"]),
            hostname=hub.hostname,
            device_id=device_id,
            server_verification_cert=hub.ca_pem,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        try:
            call_with_timeout(client.shutdown, timeout=10, what="client.shutdown")
        except Exception:  # noqa: BLE001 - teardown must not mask the test's own result
            pass


@pytest.fixture
def x509_devices(registry_manager):
    created = []
    yield created
    for device_id in created:
        try:
            call_with_timeout(registry_manager.delete_device, device_id, timeout=10)
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


@pytest.fixture
def fleet_ca(hub):
    name = unique_id("ca")
    simdevice(hub, "certificate", "create-ca", name)
    yield name
    try:
        simdevice(hub, "certificate", "delete", name)
    except AssertionError:
        pass


def telemetry_and_method(hub, registry_manager, client, device_id):
    """The client connects, its message reaches the hub, and it answers a direct method."""
    calls = queue.Queue()

    def on_method(request):
        calls.put(request.name)
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, {"ok": request.name}))

    client.on_method_request_received = on_method
    call_with_timeout(client.connect, what="connect with an X.509 certificate")
    message = Message(json.dumps({"x509": device_id}))
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    call_with_timeout(client.send_message, message, what="send_message")
    events = wait_for(lambda: hub.recent_events(device_id), what="the message at the hub")
    assert events[0]["body"] == {"x509": device_id}
    result = call_with_timeout(
        registry_manager.invoke_device_method,
        device_id,
        CloudToDeviceMethod(method_name="reboot", payload={}, response_timeout_in_seconds=15),
        what="invoke_device_method",
    )
    assert result.status == 200
    assert result.payload == {"ok": "reboot"}
    assert calls.get(timeout=5) == "reboot"


def test_self_signed_device_by_thumbprint(hub, registry_manager, certs, x509_clients, x509_devices):
    device_id = unique_id("x509-ss")
    issued = certs(device_id)
    other = certs(device_id)
    # Primary: another certificate's SHA-1; secondary: this one's SHA-256.
    device = call_with_timeout(
        registry_manager.create_device_with_x509,
        device_id,
        other["thumbprintSha1"],
        issued["thumbprintSha256"],
        "enabled",
        what="create_device_with_x509",
    )
    x509_devices.append(device_id)
    assert device.authentication.type == "selfSigned"
    assert device.authentication.x509_thumbprint.secondary_thumbprint == issued["thumbprintSha256"]
    shown = call_with_timeout(registry_manager.get_device, device_id, what="get_device")
    assert shown.authentication.x509_thumbprint.primary_thumbprint == other["thumbprintSha1"]
    assert shown.authentication.symmetric_key.primary_key is None
    telemetry_and_method(hub, registry_manager, x509_clients(device_id, issued), device_id)


def test_ca_signed_device(hub, registry_manager, certs, x509_clients, x509_devices, fleet_ca):
    device_id = unique_id("x509-ca")
    device = call_with_timeout(
        registry_manager.create_device_with_certificate_authority,
        device_id,
        "enabled",
        what="create_device_with_certificate_authority",
    )
    x509_devices.append(device_id)
    assert device.authentication.type == "certificateAuthority"
    issued = certs(device_id, ca=fleet_ca)
    telemetry_and_method(hub, registry_manager, x509_clients(device_id, issued), device_id)


def assert_refused(client):
    with pytest.raises((CredentialError, ClientError)) as caught:
        call_with_timeout(client.connect, what="a refused connect")
    assert not client.connected
    return caught.value


def test_refusals_seen_by_the_sdk(hub, registry_manager, certs, x509_clients, x509_devices, fleet_ca):
    ca_device = unique_id("x509-ref-ca")
    call_with_timeout(registry_manager.create_device_with_certificate_authority, ca_device, "enabled")
    ss_device = unique_id("x509-ref-ss")
    registered = certs(ss_device)
    call_with_timeout(
        registry_manager.create_device_with_x509, ss_device, registered["thumbprintSha1"], None, "enabled"
    )
    x509_devices.extend([ca_device, ss_device])

    # Wrong CN: a trusted CA's certificate for another device id.
    error = assert_refused(x509_clients(ca_device, certs(unique_id("someone"), ca=fleet_ca)))
    assert isinstance(error, CredentialError), repr(error)
    # Unknown thumbprint.
    error = assert_refused(x509_clients(ss_device, certs(ss_device)))
    assert isinstance(error, CredentialError), repr(error)
    # Expired.
    error = assert_refused(x509_clients(ca_device, certs(ca_device, ca=fleet_ca, days=-1)))
    assert isinstance(error, CredentialError), repr(error)
    # From another CA: one the hub no longer trusts.
    gone = unique_id("gone-ca")
    simdevice(hub, "certificate", "create-ca", gone)
    from_gone = certs(ca_device, ca=gone)
    simdevice(hub, "certificate", "delete", gone)
    error = assert_refused(x509_clients(ca_device, from_gone))
    assert isinstance(error, CredentialError), repr(error)
    # The control: the registered certificate still connects.
    client = x509_clients(ss_device, registered)
    call_with_timeout(client.connect, what="connect with the registered certificate")
    assert client.connected
