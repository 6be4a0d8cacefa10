"""azure-iot-device 2.14.0 (MQTT) against simdevice hub, checked through azure-iot-hub 2.7.0."""

import base64
import datetime
import json
import os
import queue
import time
import uuid

import pytest
from azure.iot.device import Message, MethodResponse
from azure.iot.device.exceptions import ClientError, CredentialError
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import call_with_timeout, http_error_status, http_error_text, wait_for


def connect(client):
    call_with_timeout(client.connect, what="IoTHubDeviceClient.connect")
    assert client.connected


def wait_for_connection_state(registry_manager, device_id, state):
    """What the service reports for the device (Device.connectionState) reaches `state`."""
    wait_for(
        lambda: call_with_timeout(registry_manager.get_device, device_id).connection_state == state,
        timeout=10,
        what="the service to report {} as {}".format(device_id, state),
    )


def test_device_connects_with_the_hub_ca(make_device, device_client_factory, registry_manager):
    device_id, _, connection_string = make_device("conn")
    client = device_client_factory(connection_string)

    connect(client)

    wait_for_connection_state(registry_manager, device_id, "Connected")

    call_with_timeout(client.disconnect, what="disconnect")
    wait_for_connection_state(registry_manager, device_id, "Disconnected")


def test_device_without_the_hub_ca_does_not_trust_the_hub(make_device, device_client_factory):
    """The hub's certificate chains to its own CA only: without it TLS verification fails."""
    _, _, connection_string = make_device("noca")
    client = device_client_factory(connection_string, server_verification_cert=None)

    with pytest.raises(ClientError) as caught:
        call_with_timeout(client.connect, what="connect trusting only the system CAs")
    assert not isinstance(caught.value, CredentialError)
    assert not client.connected


def test_wrong_device_key_is_refused(make_device, device_client_factory, hub):
    device_id, _, _ = make_device("badkey")
    wrong_key = base64.b64encode(os.urandom(32)).decode()
    client = device_client_factory(hub.device_connection_string(device_id, wrong_key))

    with pytest.raises(CredentialError):
        call_with_timeout(client.connect, what="connect with a wrong key")
    assert not client.connected


def test_disabled_device_is_refused(make_device, device_client_factory):
    _, _, connection_string = make_device("disabled", status="disabled")
    client = device_client_factory(connection_string)

    with pytest.raises(CredentialError):
        call_with_timeout(client.connect, what="connect as a disabled device")


def test_telemetry_reaches_the_hub_with_body_and_properties(make_device, device_client_factory, hub):
    device_id, _, connection_string = make_device("telemetry")
    client = device_client_factory(connection_string)
    connect(client)

    message_id = "mid-" + uuid.uuid4().hex
    body = {"temperature": 21.5, "door": "open", "n": 1}
    message = Message(json.dumps(body))
    message.message_id = message_id
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    # A space and a slash make sure the hub percent-decodes the property bag.
    message.custom_properties["alert"] = "no"
    message.custom_properties["temp unit"] = "C/F"
    call_with_timeout(client.send_message, message, what="send_message (waits for PUBACK)")

    text_id = "mid-" + uuid.uuid4().hex
    text = Message("plain text, not json")
    text.message_id = text_id
    call_with_timeout(client.send_message, text, what="send_message (text body)")

    def find(mid):
        for event in hub.recent_events(device_id):
            if event.get("systemProperties", {}).get("message-id") == mid:
                return event
        return None

    event = wait_for(lambda: find(message_id), what="the JSON message in /simdevice/events")
    assert event["deviceId"] == device_id
    assert event["body"] == body
    assert event["properties"] == {"alert": "no", "temp unit": "C/F"}
    system = event["systemProperties"]
    assert system["content-type"] == "application/json"
    assert system["content-encoding"] == "utf-8"
    assert system["iothub-connection-device-id"] == device_id
    enqueued = datetime.datetime.fromisoformat(event["enqueuedTime"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - enqueued).total_seconds()) < 300

    event = wait_for(lambda: find(text_id), what="the text message in /simdevice/events")
    assert event["body"] == "plain text, not json"
    assert event["properties"] == {}


def test_device_reads_its_twin_including_desired_set_by_the_service(
    make_device, device_client_factory, registry_manager
):
    device_id, _, connection_string = make_device("twinget")
    updated = call_with_timeout(
        registry_manager.update_twin, device_id, Twin(properties=TwinProperties(desired={"interval": 5})), "*"
    )
    desired_version = updated.properties.desired["$version"]

    client = device_client_factory(connection_string)
    connect(client)
    twin = call_with_timeout(client.get_twin, what="get_twin")

    assert set(twin) >= {"desired", "reported"}, twin
    assert twin["desired"]["interval"] == 5
    assert twin["desired"]["$version"] == desired_version
    assert isinstance(twin["reported"]["$version"], int)


def test_reported_properties_are_seen_by_the_service(make_device, device_client_factory, registry_manager):
    device_id, _, connection_string = make_device("reported")
    client = device_client_factory(connection_string)
    connect(client)
    before = call_with_timeout(client.get_twin, what="get_twin")["reported"]["$version"]

    call_with_timeout(
        client.patch_twin_reported_properties,
        {"firmware": "1.2.3", "connectivity": {"type": "cellular"}},
        what="patch_twin_reported_properties",
    )

    twin = call_with_timeout(registry_manager.get_twin, device_id)
    reported = twin.properties.reported
    assert reported["firmware"] == "1.2.3"
    assert reported["connectivity"]["type"] == "cellular"
    assert reported["$version"] > before

    # null deletes a reported property
    call_with_timeout(client.patch_twin_reported_properties, {"firmware": None}, what="patch with null")
    reported = call_with_timeout(registry_manager.get_twin, device_id).properties.reported
    assert "firmware" not in reported
    assert reported["connectivity"]["type"] == "cellular"


def test_desired_patch_from_the_service_reaches_the_handler(make_device, device_client_factory, registry_manager):
    device_id, _, connection_string = make_device("desired")
    client = device_client_factory(connection_string)
    connect(client)
    patches = queue.Queue()
    # Setting the handler subscribes (and blocks until SUBACK).
    call_with_timeout(
        setattr, client, "on_twin_desired_properties_patch_received", patches.put, what="subscribe to desired patches"
    )

    current = call_with_timeout(registry_manager.get_twin, device_id)
    updated = call_with_timeout(
        registry_manager.update_twin,
        device_id,
        Twin(properties=TwinProperties(desired={"targetTemperature": 21})),
        current.etag,
    )
    new_version = updated.properties.desired["$version"]
    assert updated.properties.desired["targetTemperature"] == 21

    try:
        patch = patches.get(timeout=10)
    except queue.Empty:
        pytest.fail("no desired-properties patch reached the device within 10 s")
    assert patch["targetTemperature"] == 21
    assert patch["$version"] == new_version


def test_direct_method_round_trip(make_device, device_client_factory, registry_manager):
    device_id, _, connection_string = make_device("method")
    client = device_client_factory(connection_string)
    connect(client)
    seen = []

    def on_method(request):
        seen.append((request.name, request.payload))
        if request.name == "reboot":
            response = MethodResponse.create_from_method_request(
                request, 200, {"accepted": True, "echo": request.payload}
            )
        else:
            response = MethodResponse.create_from_method_request(request, 404, {"error": "unknown method"})
        client.send_method_response(response)

    call_with_timeout(setattr, client, "on_method_request_received", on_method, what="subscribe to methods")

    result = call_with_timeout(
        registry_manager.invoke_device_method,
        device_id,
        CloudToDeviceMethod(method_name="reboot", payload={"delaySeconds": 3}, response_timeout_in_seconds=10),
        what="invoke_device_method reboot",
    )
    assert result.status == 200
    assert result.payload == {"accepted": True, "echo": {"delaySeconds": 3}}
    assert seen[0] == ("reboot", {"delaySeconds": 3})

    # The status is the device's choice and reaches the caller as is.
    result = call_with_timeout(
        registry_manager.invoke_device_method,
        device_id,
        CloudToDeviceMethod(method_name="selfDestruct", payload=None, response_timeout_in_seconds=10),
        what="invoke_device_method selfDestruct",
    )
    assert result.status == 404
    assert result.payload == {"error": "unknown method"}


def test_direct_method_on_offline_device_is_404103(make_device, registry_manager):
    device_id, _, _ = make_device("offline")

    with pytest.raises(HttpOperationError) as caught:
        call_with_timeout(
            registry_manager.invoke_device_method,
            device_id,
            CloudToDeviceMethod(method_name="reboot", payload={}, response_timeout_in_seconds=5),
            what="invoke_device_method on an offline device",
        )
    assert http_error_status(caught.value) == 404
    assert "404103" in http_error_text(caught.value)


def test_subscriptions_survive_a_reconnect(make_device, device_client_factory, registry_manager):
    """The SDK connects with clean session = 0 and never re-subscribes after a reconnect.

    It relies on the hub keeping the session's subscriptions, as IoT Hub does; without that a
    device silently stops receiving method calls and twin responses after any reconnect.
    """
    device_id, _, connection_string = make_device("resub")
    client = device_client_factory(connection_string)
    connect(client)

    def on_method(request):
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, {"pong": True}))

    call_with_timeout(setattr, client, "on_method_request_received", on_method, what="subscribe to methods")
    call_with_timeout(client.get_twin, what="get_twin (subscribes to twin responses)")

    call_with_timeout(client.disconnect, what="disconnect")
    wait_for_connection_state(registry_manager, device_id, "Disconnected")
    connect(client)

    result = call_with_timeout(
        registry_manager.invoke_device_method,
        device_id,
        CloudToDeviceMethod(method_name="ping", payload=None, response_timeout_in_seconds=10),
        what="invoke_device_method after reconnect",
    )
    assert (result.status, result.payload) == (200, {"pong": True})
    twin = call_with_timeout(client.get_twin, what="get_twin after reconnect")
    assert "desired" in twin


def test_direct_method_without_answer_times_out_with_504101(make_device, device_client_factory, registry_manager):
    device_id, _, connection_string = make_device("silent")
    client = device_client_factory(connection_string)
    connect(client)
    received = queue.Queue()
    call_with_timeout(setattr, client, "on_method_request_received", received.put, what="subscribe to methods")

    started = time.monotonic()
    with pytest.raises(HttpOperationError) as caught:
        call_with_timeout(
            registry_manager.invoke_device_method,
            device_id,
            CloudToDeviceMethod(method_name="slow", payload={}, response_timeout_in_seconds=5),
            what="invoke_device_method that the device never answers",
        )
    elapsed = time.monotonic() - started
    assert http_error_status(caught.value) == 504
    assert "504101" in http_error_text(caught.value)
    assert 4.5 <= elapsed < 15, "responseTimeoutInSeconds=5 but the call took {:.1f} s".format(elapsed)
    assert received.get(timeout=1).name == "slow"
