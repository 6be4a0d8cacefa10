"""The built-in Event Hubs-compatible endpoint, read with Microsoft's azure-eventhub (5.15.1, its
pure-Python AMQP client): what the device SDK sends arrives at EventHubConsumerClient with IoT
Hub's annotations, from the device's partition, and the hub's properties match.

Pointing the SDK at the local hub: over TLS, azure-eventhub always dials 5671, so the client is
given custom_endpoint_address="sb://localhost:<amqp_port>" and trusts the hub's CA with
connection_verify=<ca.pem>; in emulator mode (UseDevelopmentEmulator=true) it dials the port of
Endpoint= in plain AMQP, the hub's amqp_plain_port.
"""

import asyncio
import datetime
import json
import threading
import uuid

import pytest

from conftest import call_with_timeout, wait_for

RECEIVE_TIMEOUT = 30.0


def fnv1a(text):
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(device_id, partitions=4):
    """The hub's documented partitioning: FNV-1a (32 bits) of the device id, modulo the count."""
    return str(fnv1a(device_id) % partitions)


def tls_client(hub, connection_string=None, **kwargs):
    from azure.eventhub import EventHubConsumerClient

    return EventHubConsumerClient.from_connection_string(
        connection_string or hub.info["eventhub_connection_string"],
        consumer_group="$Default",
        custom_endpoint_address="sb://localhost:{}".format(hub.info["amqp_port"]),
        connection_verify=hub.ca_file,
        **kwargs,
    )


def emulator_client(hub):
    from azure.eventhub import EventHubConsumerClient

    return EventHubConsumerClient.from_connection_string(
        hub.info["eventhub_emulator_connection_string"], consumer_group="$Default"
    )


def receive(client, partition_id, want, starting_position="-1", inclusive=False, timeout=RECEIVE_TIMEOUT):
    """Events of one partition until `want(events)` holds, or fail after `timeout`."""
    events = []
    done = threading.Event()
    errors = []

    def on_event(_context, event):
        if event is not None:
            events.append(event)
            if want(events):
                done.set()

    def on_error(_context, error):
        errors.append(error)
        done.set()

    worker = threading.Thread(
        target=client.receive,
        kwargs=dict(
            on_event=on_event,
            on_error=on_error,
            partition_id=partition_id,
            starting_position=starting_position,
            starting_position_inclusive=inclusive,
            max_wait_time=1,
        ),
        daemon=True,
    )
    worker.start()
    finished = done.wait(timeout)
    client.close()
    worker.join(10)
    assert not errors, "the receiver failed: {!r}".format(errors)
    assert finished, "no matching events within {} s; got {!r}".format(timeout, [e.body_as_str() for e in events])
    return events


def send_readings(device_client_factory, connection_string, count, tag):
    from azure.iot.device import Message

    client = device_client_factory(connection_string)
    call_with_timeout(client.connect, what="connect")
    sent = []
    for n in range(count):
        message = Message(json.dumps({"tag": tag, "n": n}))
        message.message_id = "{}-{}".format(tag, n)
        message.content_type = "application/json"
        message.content_encoding = "utf-8"
        message.custom_properties["unit"] = "celsius"
        call_with_timeout(client.send_message, message, what="send_message")
        sent.append(message.message_id)
    return sent


def ours(tag):
    """Whether an event is one of this test's readings. The session's hub keeps every test's
    events, and other tests send bodies that are not JSON objects (or not text at all)."""

    def is_ours(event):
        try:
            body = json.loads(event.body_as_str())
        except (ValueError, TypeError):
            return False
        return isinstance(body, dict) and body.get("tag") == tag

    return is_ours


def test_hub_json_names_the_endpoint(hub):
    info = hub.info
    assert int(info["amqp_port"]) > 0
    assert int(info["amqp_plain_port"]) > 0
    cs = info["eventhub_connection_string"]
    assert cs.startswith("Endpoint=sb://localhost/;SharedAccessKeyName=service;SharedAccessKey=")
    assert cs.endswith(";EntityPath=localhost")
    assert "UseDevelopmentEmulator=true" in info["eventhub_emulator_connection_string"]


def test_tls_consumer_receives_every_reading_with_iot_hub_annotations(hub, make_device, device_client_factory):
    device_id, _, cs = make_device("eh")
    tag = uuid.uuid4().hex
    sent = send_readings(device_client_factory, cs, 5, tag)
    client = tls_client(hub)
    events = receive(client, partition_of(device_id), lambda evs: len([e for e in evs if ours(tag)(e)]) >= 5)
    mine = [e for e in events if ours(tag)(e)]
    assert [e.message_id for e in mine] == sent
    first = mine[0]
    assert first.system_properties[b"iothub-connection-device-id"] == device_id.encode()
    assert first.system_properties[b"iothub-message-source"] == b"Telemetry"
    assert b"iothub-connection-auth-generation-id" in first.system_properties
    assert first.properties == {b"unit": b"celsius"}
    assert first.content_type == "application/json"
    assert first.system_properties[b"content-encoding"] == b"utf-8"
    sequences = [e.sequence_number for e in mine]
    assert sequences == sorted(sequences) and len(set(sequences)) == 5
    offsets = [int(e.offset) for e in mine]
    assert offsets == sorted(offsets)


def test_a_message_without_system_properties_has_no_properties_section(hub, make_device, device_client_factory):
    """A plain string with no message id, content type or encoding: the event carries no AMQP
    properties section, which Microsoft's own e2e helpers (dev_utils' service_helper) rely on
    when they read `properties.content_type` of every event that has the section."""
    device_id, _, cs = make_device("eh-plain")
    tag = uuid.uuid4().hex
    client = device_client_factory(cs)
    call_with_timeout(client.connect, what="connect")
    call_with_timeout(client.send_message, "plain " + tag, what="send_message")
    consumer = tls_client(hub)

    def mine(event):
        try:
            return event.body_as_str() == "plain " + tag
        except (ValueError, TypeError):
            return False

    events = receive(consumer, partition_of(device_id), lambda evs: any(mine(e) for e in evs))
    event = next(e for e in events if mine(e))
    assert event.raw_amqp_message.properties is None
    assert event.system_properties[b"iothub-connection-device-id"] == device_id.encode()


def test_resume_from_an_offset_and_from_an_enqueued_time(hub, make_device, device_client_factory):
    device_id, _, cs = make_device("ehr")
    tag = uuid.uuid4().hex
    send_readings(device_client_factory, cs, 4, tag)
    partition = partition_of(device_id)
    everything = receive(tls_client(hub), partition, lambda evs: len([e for e in evs if ours(tag)(e)]) >= 4)
    mine = [e for e in everything if ours(tag)(e)]
    checkpoint = mine[1]
    # From a checkpointed offset (exclusive, as the checkpoint store does): the third on.
    resumed = receive(tls_client(hub), partition, lambda evs: len(evs) >= 2, starting_position=checkpoint.offset)
    assert [json.loads(e.body_as_str())["n"] for e in resumed[:2]] == [2, 3]
    # From an enqueued time, inclusive: the second on. Enqueued times are milliseconds, so an
    # earlier event of the same millisecond comes too (as from Event Hubs); none before it.
    last = mine[3].sequence_number
    resumed = receive(
        tls_client(hub),
        partition,
        lambda evs: any(e.sequence_number >= last for e in evs),
        starting_position=checkpoint.enqueued_time,
        inclusive=True,
    )
    assert all(e.enqueued_time >= checkpoint.enqueued_time for e in resumed)
    sequences = [e.sequence_number for e in resumed]
    start = sequences.index(checkpoint.sequence_number)
    assert all(e.enqueued_time == checkpoint.enqueued_time for e in resumed[:start])
    assert sequences[start:start + 3] == [e.sequence_number for e in mine[1:4]]


def test_hub_and_partition_properties_match(hub, make_device, device_client_factory):
    device_id, _, cs = make_device("ehp")
    tag = uuid.uuid4().hex
    send_readings(device_client_factory, cs, 1, tag)
    client = tls_client(hub)
    with client:
        props = call_with_timeout(client.get_eventhub_properties, what="get_eventhub_properties")
        assert props["eventhub_name"] == "localhost"
        assert props["partition_ids"] == ["0", "1", "2", "3"]
        assert props["created_at"] <= datetime.datetime.now(datetime.timezone.utc)
        partition = call_with_timeout(
            client.get_partition_properties, partition_of(device_id), what="get_partition_properties"
        )
    assert partition["id"] == partition_of(device_id)
    assert partition["is_empty"] is False
    last = receive(tls_client(hub), partition_of(device_id), lambda evs: any(ours(tag)(e) for e in evs))
    newest = max(last, key=lambda e: e.sequence_number)
    assert partition["last_enqueued_sequence_number"] >= newest.sequence_number
    assert partition["beginning_sequence_number"] <= newest.sequence_number


def test_async_consumer_in_emulator_mode(hub, make_device, device_client_factory):
    from azure.eventhub.aio import EventHubConsumerClient

    device_id, _, cs = make_device("eha")
    tag = uuid.uuid4().hex
    send_readings(device_client_factory, cs, 3, tag)

    async def main():
        got = []
        done = asyncio.Event()
        client = EventHubConsumerClient.from_connection_string(
            hub.info["eventhub_emulator_connection_string"], consumer_group="$Default"
        )

        async def on_event(_context, event):
            if event is not None and ours(tag)(event):
                got.append(event)
                if len(got) >= 3:
                    done.set()

        async with client:
            task = asyncio.ensure_future(
                client.receive(on_event=on_event, partition_id=partition_of(device_id), starting_position="-1")
            )
            try:
                await asyncio.wait_for(done.wait(), RECEIVE_TIMEOUT)
            finally:
                await client.close()
                task.cancel()
        return got

    got = asyncio.run(main())
    assert [json.loads(e.body_as_str())["n"] for e in got] == [0, 1, 2]
    assert got[0].system_properties[b"iothub-connection-device-id"] == device_id.encode()


def _refused(hub, connection_string):
    from azure.eventhub.exceptions import AuthenticationError, ConnectError, EventHubError

    client = tls_client(hub, connection_string, retry_total=0)
    with pytest.raises((AuthenticationError, ConnectError, EventHubError)):
        with client:
            call_with_timeout(client.get_partition_properties, "0", what="get_partition_properties")


def test_a_wrong_key_is_refused(hub):
    cs = hub.info["eventhub_connection_string"]
    head, _, _ = cs.partition("SharedAccessKey=")
    wrong = head + "SharedAccessKey=" + "d3Jvbmcta2V5LXdyb25nLWtleQ==" + ";EntityPath=localhost"
    _refused(hub, wrong)


def test_a_policy_without_service_connect_is_refused(hub):
    # registryRead has RegistryRead only; its key comes from the hub's own policies.
    from azure.iot.hub import IoTHubRegistryManager  # noqa: F401 - same venv, documents the suite

    import sqlite3

    db = sqlite3.connect(str(hub.state_dir / "hub.db"))
    try:
        (key,) = db.execute("SELECT primary_key FROM policies WHERE name = 'registryRead'").fetchone()
    finally:
        db.close()
    cs = "Endpoint=sb://localhost/;SharedAccessKeyName=registryRead;SharedAccessKey={};EntityPath=localhost".format(key)
    _refused(hub, cs)


def test_a_reported_patch_reaches_the_consumer_as_a_twin_change_event(hub, make_device, device_client_factory):
    """What Microsoft's own device SDK e2e suite checks (service_helper: a twinChangeEvents event
    whose body's properties.reported holds the patch), with the properties IoT Hub sets (its
    "non-telemetry event schemas" page)."""
    device_id, _, cs = make_device("ehtw")
    client = device_client_factory(cs)
    call_with_timeout(client.connect, what="connect")
    tag = uuid.uuid4().hex
    call_with_timeout(client.patch_twin_reported_properties, {"tag": tag, "gone": None}, what="patch_twin_reported_properties")

    def twin_change_of_ours(event):
        if event.system_properties.get(b"iothub-message-source") != b"twinChangeEvents":
            return False
        body = json.loads(event.body_as_str())
        return body.get("properties", {}).get("reported", {}).get("tag") == tag

    events = receive(tls_client(hub), partition_of(device_id), lambda evs: any(twin_change_of_ours(e) for e in evs))
    event = next(e for e in events if twin_change_of_ours(e))
    body = event.body_as_json()
    reported = body["properties"]["reported"]
    assert "gone" in reported and reported["gone"] is None, body
    assert isinstance(reported["$version"], int) and isinstance(body["version"], int)
    assert "tag" in reported["$metadata"], body
    assert event.system_properties[b"iothub-connection-device-id"] == device_id.encode()
    assert event.properties[b"hubName"] == b"localhost"
    assert event.properties[b"deviceId"] == device_id.encode()
    assert event.properties[b"opType"] == b"updateTwin"
    assert event.properties[b"iothub-message-schema"] == b"twinChangeNotification"
    assert b"operationTimestamp" in event.properties
    assert event.content_type == "application/json"
    assert event.system_properties[b"content-encoding"] == b"utf-8"
    assert b"iothub-connection-auth-generation-id" not in event.system_properties
