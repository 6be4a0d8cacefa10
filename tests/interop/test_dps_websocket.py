"""The official Python provisioning client (azure-iot-device 2.14) with websockets=True against
the hub's local DPS over WebSocket (hub.json's `dps_ws_port`), directly and through an HTTP
CONNECT proxy started here; the device it got then connects to the assigned hub over WebSocket.

For DPS over WebSocket the SDK dials the provisioning host's port 443, path /$iothub/websocket,
subprotocol mqtt (its MQTTTransport with websockets=True, as for the hub). Real DPS has its own
host; locally DPS's WebSocket has its own port, so while a provisioning client registers, paho's
connects to 443 go to `dps_ws_port`, and while a device client runs, to the hub's `ws_port`
(host name unchanged: the TLS host-name check and the WebSocket Host header stay the SDK's).
"""

import contextlib
import json

import paho.mqtt.client as paho_client
import pytest
from azure.iot.device import Message, ProvisioningDeviceClient, exceptions
from azure.iot.device import ProxyOptions

from conftest import call_with_timeout, unique_id, wait_for
from test_dps import derive_device_key, dps_request
from test_websocket import connect_proxy, websocket_port  # noqa: F401 (fixtures)


@contextlib.contextmanager
def _port_443_to(target):
    patched = paho_client.Client.connect

    def connect(self, host, port=1883, *args, **kwargs):
        if port == 443:
            port = target
        return patched(self, host, port, *args, **kwargs)

    paho_client.Client.connect = connect
    try:
        yield
    finally:
        paho_client.Client.connect = patched


def _group(hub):
    group_id = unique_id("ws-group")
    put = dps_request(
        hub,
        "PUT",
        "/enrollmentGroups/" + group_id,
        {"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}},
    )
    assert put.status_code == 200, put.text
    return put.json()["attestation"]["symmetricKey"]["primaryKey"]


def _register_over_websocket(hub, registration_id, key, proxy_options=None):
    assert hub.info.get("dps_ws_port"), "hub.json must give dps_ws_port"
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=hub.info["id_scope"],
        symmetric_key=key,
        server_verification_cert=hub.ca_pem,
        websockets=True,
        proxy_options=proxy_options,
    )
    with _port_443_to(int(hub.info["dps_ws_port"])):
        return call_with_timeout(client.register, timeout=30, what="ProvisioningDeviceClient.register (websockets)")


def _send_over_websocket(hub, device_client_factory, device_id, key, **kwargs):
    client = device_client_factory(hub.device_connection_string(device_id, key), websockets=True, **kwargs)
    call_with_timeout(client.connect, what="IoTHubDeviceClient.connect (websockets)")
    body = json.dumps({"provisioned": "websocket"})
    call_with_timeout(client.send_message, Message(body), what="send_message")
    wait_for(lambda: any(e["deviceId"] == device_id for e in hub.recent_events(device_id)), what="the message")
    return client


def test_hub_json_names_the_dps_websocket_port(hub):
    port = int(hub.info.get("dps_ws_port", 0))
    assert port, "hub.json lacks dps_ws_port"
    assert port not in (int(hub.info["dps_port"]), hub.ws_port, int(hub.info["mqtt_port"]))


def test_a_group_device_registers_over_websocket_and_connects_over_websocket(
    hub, device_client_factory, websocket_port  # noqa: F811
):
    group_key = _group(hub)
    registration_id = unique_id("ws-dps-dev")
    device_key = derive_device_key(group_key, registration_id)
    result = _register_over_websocket(hub, registration_id, device_key)
    assert result.status == "assigned", str(result)
    assert result.registration_state.assigned_hub == "localhost"
    assert result.registration_state.device_id == registration_id
    # The websocket_port fixture sends 443 to the hub's ws_port for the device client.
    _send_over_websocket(hub, device_client_factory, registration_id, device_key)


def test_a_registration_over_websocket_through_an_http_connect_proxy(
    hub, device_client_factory, websocket_port, connect_proxy  # noqa: F811
):
    group_key = _group(hub)
    registration_id = unique_id("ws-dps-px")
    device_key = derive_device_key(group_key, registration_id)
    proxy = ProxyOptions(proxy_type="HTTP", proxy_addr="127.0.0.1", proxy_port=connect_proxy.port)
    result = _register_over_websocket(hub, registration_id, device_key, proxy_options=proxy)
    assert result.status == "assigned", str(result)
    assert connect_proxy.tunnels() == ["localhost:{}".format(hub.info["dps_ws_port"])], connect_proxy.tunnels()

    _send_over_websocket(hub, device_client_factory, registration_id, device_key, proxy_options=proxy)
    tunnels = connect_proxy.tunnels()
    assert "localhost:{}".format(websocket_port) in tunnels, tunnels


def test_a_wrong_key_over_websocket_is_refused(hub):
    group_key = _group(hub)
    registration_id = unique_id("ws-dps-bad")
    wrong = derive_device_key(group_key, registration_id + "-other")
    # CONNACK 5 over the WebSocket, as over MQTT/TLS (test_dps.py): the SDK's CredentialError.
    with pytest.raises(exceptions.CredentialError):
        _register_over_websocket(hub, registration_id, wrong)
