"""azure-iot-device 2.14.0 (MQTT) against simdevice hub, checked through azure-iot-hub 2.7.0."""

import base64
import datetime
import json
import os
import queue
import uuid

import pytest
from azure.iot.device import Message, MethodResponse
from azure.iot.device.exceptions import CredentialError
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import call_with_timeout, http_error_status, http_error_text, wait_for


def connect(client):
    call_with_timeout(client.connect, what="IoTHubDeviceClient.connect")
    assert client.connected


def test_device_connects_with_the_hub_ca(make_device, device_client_factory, registry_manager):
    device_id, _, connection_string = make_device("conn")
    client = device_client_factory(connection_string)

    connect(client)

    device = wait_for(
        lambda: (lambda d: d if d.connection_state == "Connected" else None)(
            call_with_timeout(registry_manager.get_device, device_id)
        ),
        what="the service to report the device as Connected",
    )
    assert device.device_id == device_id


def test_wrong_device_key_is_refused(make_device, device_client_factory, hub):
    device_id, _, _ = make_device("badkey")
    wrong_key = base64.b64encode(os.urandom(32)).decode()
    client = device_client_factory(hub.device_connection_string(device_id, wrong_key))

    with pytest.raises(CredentialError):
        call_with_timeout(client.connect, what="connect with a wrong key")
    assert not client.connected


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
