"""The official Python provisioning client (azure-iot-device 2.14) against the hub's local DPS.

Enrollments are written through the DPS service REST API (api-version 2021-10-01) with the
`dps_service_connection_string` of hub.json; `ProvisioningDeviceClient.create_from_symmetric_key`
registers (individual and group enrollments), and the device it got then connects to the
assigned hub with `IoTHubDeviceClient` and sends a message. X.509: an enrollment group naming a
CA the hub generated (`x509.caReferences`), `create_from_x509_certificate` on both clients with
a certificate that CA issued (CN = registration id); a certificate of another CA is refused.

paho dials port 8883 for DPS as for the hub: while a provisioning client registers, 8883 is
sent to the hub's `dps_port` instead of its `mqtt_port` (`_dps_port_for_8883`).
"""

import base64
import contextlib
import hashlib
import hmac
import json

import paho.mqtt.client as paho_client
import pytest
import requests
from azure.iot.device import X509, IoTHubDeviceClient, Message, ProvisioningDeviceClient, exceptions

from conftest import call_with_timeout, service_sas, unique_id, wait_for

DPS_API_VERSION = "2021-10-01"


def derive_device_key(group_key, registration_id):
    """The DPS group-enrollment derivation, as Microsoft's docs write it in Python."""
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("utf-8")


@contextlib.contextmanager
def _dps_port_for_8883(hub):
    patched = paho_client.Client.connect
    dps_port = int(hub.info["dps_port"])

    def connect(self, host, port=1883, *args, **kwargs):
        if port == 8883:
            port = dps_port
        return patched(self, host, port, *args, **kwargs)

    paho_client.Client.connect = connect
    try:
        yield
    finally:
        paho_client.Client.connect = patched


def dps_request(hub, method, path, body=None):
    response = requests.request(
        method,
        hub.api_base + path,
        params={"api-version": DPS_API_VERSION},
        json=body,
        headers={"Authorization": service_sas(hub.info["dps_service_connection_string"])},
        verify=hub.ca_file,
        timeout=10,
    )
    return response


def provisioning_client(hub, registration_id, key):
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=hub.info["id_scope"],
        symmetric_key=key,
        server_verification_cert=hub.ca_pem,
    )


def register(hub, client):
    with _dps_port_for_8883(hub):
        return call_with_timeout(client.register, timeout=30, what="ProvisioningDeviceClient.register")


def send_and_see(hub, device_client_factory, device_id, key):
    client = device_client_factory(hub.device_connection_string(device_id, key))
    call_with_timeout(client.connect, what="connect")
    body = json.dumps({"provisioned": True})
    call_with_timeout(client.send_message, Message(body), what="send_message")
    wait_for(lambda: any(e["deviceId"] == device_id for e in hub.recent_events(device_id)), what="the message")
    return client


def test_hub_json_names_the_dps(hub):
    for key in ("dps_port", "id_scope", "dps_service_connection_string"):
        assert key in hub.info, "hub.json lacks {!r}".format(key)
    assert hub.info["id_scope"].startswith("0ne")
    assert "SharedAccessKeyName=provisioningserviceowner" in hub.info["dps_service_connection_string"]


def test_a_group_enrollment_provisions_a_device_that_connects_with_its_initial_twin(
    hub, device_client_factory, registry_manager
):
    group_id = unique_id("group")
    put = dps_request(
        hub,
        "PUT",
        "/enrollmentGroups/" + group_id,
        {
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey"},
            "initialTwin": {"tags": {"site": "north"}, "properties": {"desired": {"interval": 9}}},
        },
    )
    assert put.status_code == 200, put.text
    group_key = put.json()["attestation"]["symmetricKey"]["primaryKey"]
    registration_id = unique_id("grp-dev")
    device_key = derive_device_key(group_key, registration_id)

    result = register(hub, provisioning_client(hub, registration_id, device_key))
    assert result.status == "assigned", str(result)
    assert result.registration_state.assigned_hub == "localhost"
    assert result.registration_state.device_id == registration_id

    client = send_and_see(hub, device_client_factory, registration_id, device_key)
    twin = call_with_timeout(client.get_twin, what="get_twin")
    assert twin["desired"]["interval"] == 9
    service_twin = call_with_timeout(registry_manager.get_twin, registration_id, what="get_twin (service)")
    assert service_twin.tags == {"site": "north"}
    dps_request(hub, "DELETE", "/enrollmentGroups/" + group_id)


def test_an_individual_enrollment_provisions_its_device_and_returns_the_payload(hub, device_client_factory):
    registration_id = unique_id("solo")
    device_id = unique_id("solo-device")
    put = dps_request(
        hub,
        "PUT",
        "/enrollments/" + registration_id,
        {"registrationId": registration_id, "deviceId": device_id, "attestation": {"type": "symmetricKey"}},
    )
    assert put.status_code == 200, put.text
    key = put.json()["attestation"]["symmetricKey"]["primaryKey"]

    client = provisioning_client(hub, registration_id, key)
    client.provisioning_payload = {"model": "k1"}
    result = register(hub, client)
    assert result.status == "assigned", str(result)
    assert result.registration_state.device_id == device_id
    assert json.loads(result.registration_state.response_payload) == {"model": "k1"}
    send_and_see(hub, device_client_factory, device_id, key)


def test_a_wrong_key_is_refused_with_a_credential_error(hub):
    registration_id = unique_id("nokey")
    put = dps_request(hub, "PUT", "/enrollments/" + registration_id, {"attestation": {"type": "symmetricKey"}})
    assert put.status_code == 200, put.text
    wrong = base64.b64encode(b"\x01" * 32).decode()
    with pytest.raises(exceptions.CredentialError):
        register(hub, provisioning_client(hub, registration_id, wrong))


def test_a_disabled_enrollment_is_refused_by_the_service(hub):
    registration_id = unique_id("off")
    put = dps_request(
        hub,
        "PUT",
        "/enrollments/" + registration_id,
        {"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"},
    )
    assert put.status_code == 200, put.text
    key = put.json()["attestation"]["symmetricKey"]["primaryKey"]
    with pytest.raises(exceptions.ClientError) as refused:
        register(hub, provisioning_client(hub, registration_id, key))
    assert isinstance(refused.value.__cause__, exceptions.ServiceError), repr(refused.value.__cause__)
    assert "401" in str(refused.value.__cause__)


def hub_request(hub, method, path, body=None):
    """The hub's simdevice extension (CA and device certificates), with the service policy."""
    response = requests.request(
        method,
        hub.api_base + path,
        params={"api-version": "2021-04-12"},
        json=body,
        headers={"Authorization": service_sas(hub.service_connection_string)},
        verify=hub.ca_file,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def issue_x509(hub, tmp_path, device_id, ca):
    """A device certificate (CN = device_id) issued by the hub's CA, as files for X509()."""
    issued = hub_request(hub, "POST", "/simdevice/device-certificates", {"deviceId": device_id, "ca": ca, "days": 30})
    cert_file = tmp_path / (device_id + ".pem")
    key_file = tmp_path / (device_id + ".key")
    cert_file.write_text(issued["certificate"])
    key_file.write_text(issued["privateKey"])
    key_file.chmod(0o600)
    return X509(str(cert_file), str(key_file))


def test_an_x509_group_provisions_a_device_that_connects_with_its_certificate(hub, registry_manager, tmp_path):
    ca = unique_id("dps-ca")
    hub_request(hub, "POST", "/simdevice/certificates/{}/generate".format(ca))
    group_id = unique_id("x509-group")
    put = dps_request(
        hub,
        "PUT",
        "/enrollmentGroups/" + group_id,
        {
            "enrollmentGroupId": group_id,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca}}},
            "initialTwin": {"tags": {"pki": "group"}},
        },
    )
    assert put.status_code == 200, put.text
    registration_id = unique_id("x509-dev")
    x509 = issue_x509(hub, tmp_path, registration_id, ca)

    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=hub.info["id_scope"],
        x509=x509,
        server_verification_cert=hub.ca_pem,
    )
    result = register(hub, client)
    assert result.status == "assigned", str(result)
    assert result.registration_state.device_id == registration_id
    device = call_with_timeout(registry_manager.get_device, registration_id, what="get_device")
    assert device.authentication.type == "certificateAuthority"

    device_client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509,
        hostname=result.registration_state.assigned_hub,
        device_id=result.registration_state.device_id,
        server_verification_cert=hub.ca_pem,
    )
    try:
        call_with_timeout(device_client.connect, what="connect with the provisioned certificate")
        call_with_timeout(device_client.send_message, Message(json.dumps({"x509": True})), what="send_message")
        wait_for(lambda: hub.recent_events(registration_id), what="the message at the hub")
        twin = call_with_timeout(registry_manager.get_twin, registration_id, what="get_twin (service)")
        assert twin.tags == {"pki": "group"}
    finally:
        call_with_timeout(device_client.shutdown, timeout=10, what="shutdown")


def test_a_certificate_of_another_ca_is_refused_by_the_x509_group(hub, tmp_path):
    ca = unique_id("dps-ca")
    stranger_ca = unique_id("other-ca")
    for name in (ca, stranger_ca):
        hub_request(hub, "POST", "/simdevice/certificates/{}/generate".format(name))
    group_id = unique_id("x509-group")
    put = dps_request(
        hub,
        "PUT",
        "/enrollmentGroups/" + group_id,
        {"attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca}}}},
    )
    assert put.status_code == 200, put.text
    registration_id = unique_id("x509-stranger")
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=hub.info["id_scope"],
        x509=issue_x509(hub, tmp_path, registration_id, stranger_ca),
        server_verification_cert=hub.ca_pem,
    )
    with pytest.raises(exceptions.CredentialError):
        register(hub, client)
