"""Cloud-to-device messages sent with azure-iot-hub's `IoTHubRegistryManager.send_c2d_message`
(uamqp 1.6.11, AMQP over TLS to `/messages/devicebound` after a `$cbs` put-token) reach the
Python device SDK's `on_message_received` with their properties, and our agent's C2D handler.

Pointing the SDK at the local hub: uamqp's `JWTTokenAuth` (built by azure-iot-hub's
`iothub_amqp_client`) takes no port or CA from azure-iot-hub: it dials 5671 and trusts only
certifi's bundle. It has `port=` and `verify=` keyword arguments of its own, so the
`c2d_registry_manager` fixture replaces `uamqp.authentication.JWTTokenAuth`, for the test
only, with a subclass that defaults them to the hub's `amqp_port` and CA file, then builds the
registry manager (its AMQP client reads them at construction). Nothing else is patched: the
host name (`localhost`), the token (IoT Hub style, `sr` = the HostName of the connection
string) and the link are the SDK's own.
"""

import threading
import uuid

import pytest

from conftest import call_with_timeout, wait_for
from test_scenarios import AGENT_CONNECT_TIMEOUT, device_key, run_agent  # noqa: F401 (fixture)

RECEIVE_TIMEOUT = 20.0


@pytest.fixture
def c2d_registry_manager(hub, monkeypatch):
    """An IoTHubRegistryManager whose AMQP client dials the hub's amqp_port and trusts its CA."""
    import uamqp.authentication
    from azure.iot.hub import IoTHubRegistryManager

    original = uamqp.authentication.JWTTokenAuth
    amqp_port = int(hub.info["amqp_port"])

    class LocalHubTokenAuth(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("port", amqp_port)
            kwargs.setdefault("verify", hub.ca_file)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(uamqp.authentication, "JWTTokenAuth", LocalHubTokenAuth)
    manager = IoTHubRegistryManager.from_connection_string(hub.service_connection_string)
    yield manager
    try:
        call_with_timeout(manager.amqp_svc_client.disconnect_sync, timeout=10, what="disconnect_sync")
    except Exception:  # noqa: BLE001 - teardown must not mask the test's own result
        pass


def test_send_c2d_message_reaches_on_message_received_with_its_properties(
    make_device, device_client_factory, c2d_registry_manager
):
    device_id, _, connection_string = make_device("c2d")
    client = device_client_factory(connection_string)
    received = []
    arrived = threading.Event()

    def on_message(message):
        received.append(message)
        arrived.set()

    client.on_message_received = on_message
    call_with_timeout(client.connect)

    message_id = str(uuid.uuid4())
    properties = {
        "messageId": message_id,
        "correlationId": "corr-42",
        "contentType": "application/json",
        "contentEncoding": "utf-8",
        "iothub-ack": "full",
        "kind": "note",
    }
    call_with_timeout(
        c2d_registry_manager.send_c2d_message,
        device_id,
        '{"cmd":"ping"}',
        properties,
        what="send_c2d_message",
    )
    assert arrived.wait(RECEIVE_TIMEOUT), "on_message_received was not called"
    message = received[0]
    assert message.data == b'{"cmd":"ping"}'
    assert message.message_id == message_id
    assert message.correlation_id == "corr-42"
    assert message.content_type == "application/json"
    assert message.content_encoding == "utf-8"
    assert message.ack == "full"
    assert message.custom_properties == {"kind": "note"}


def test_send_c2d_message_to_an_unknown_device_fails(c2d_registry_manager):
    with pytest.raises(Exception, match="C2D message send failure"):
        call_with_timeout(
            c2d_registry_manager.send_c2d_message,
            "no-such-device-{}".format(uuid.uuid4().hex[:8]),
            "hello",
            what="send_c2d_message",
        )


def test_send_c2d_message_reaches_the_agents_handler(hub, make_device, c2d_registry_manager, registry_manager, run_agent):
    from azure.iot.hub.models import CloudToDeviceMethod

    device_id, device, _ = make_device("c2d-agent")
    agent = run_agent(device_id, device_key(device))
    message_id = "agent-{}".format(uuid.uuid4().hex[:8])
    # Sent whether or not the agent has subscribed yet: the hub queues it until it has.
    call_with_timeout(
        c2d_registry_manager.send_c2d_message,
        device_id,
        "open sesame",
        {"messageId": message_id, "kind": "note"},
        what="send_c2d_message",
    )

    def handled():
        agent.assert_running()
        return message_id in agent.full_output() and "cloud-to-device message received" in agent.full_output()

    try:
        wait_for(handled, timeout=AGENT_CONNECT_TIMEOUT, interval=0.5, what="the agent's C2D log line")
    except AssertionError as error:
        raise AssertionError("{}\n{}".format(error, agent.output())) from None
    assert "open sesame" in agent.full_output(), "the handler logs the body"

    info = call_with_timeout(
        registry_manager.invoke_device_method,
        device_id,
        CloudToDeviceMethod(method_name="getDeviceInfo", payload=None, response_timeout_in_seconds=10),
        what="invoke_device_method getDeviceInfo",
    )
    assert info.payload["counters"]["cloudToDeviceMessages"] == 1
