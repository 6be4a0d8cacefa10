"""Capture files (`simdevice hub --capture DIR`) read by the Python Avro readers.

For each format (eventhubs, iothub) and codec (deflate, null) a hub of its own is started as a
subprocess with a 1 s window; the official device SDK (azure-iot-device) sends readings with a
content type, an encoding and an application property; the files that appear are read with
both `fastavro` and `avro` (the Apache reference implementation), and the schema, the codec and
every field are checked against what was sent.
"""

import base64
import datetime
import hashlib
import hmac
import json
import pathlib
import re
import signal
import subprocess
import time

import pytest
from azure.iot.device import IoTHubDeviceClient, Message

from conftest import HUB_START_TIMEOUT, _hub_binary, _redirect_port_8883, call_with_timeout, wait_for

EVENTHUBS_FIELDS = [
    ("SequenceNumber", "long"),
    ("Offset", "string"),
    ("EnqueuedTimeUtc", "string"),
    ("SystemProperties", {"type": "map", "values": ["long", "double", "string", "bytes"]}),
    ("Properties", {"type": "map", "values": ["long", "double", "string", "bytes"]}),
    ("Body", ["null", "bytes"]),
]
IOTHUB_FIELDS = [
    ("EnqueuedTimeUtc", "string"),
    ("Properties", {"type": "map", "values": "string"}),
    ("SystemProperties", {"type": "map", "values": "string"}),
    ("Body", ["null", "bytes"]),
]


def derive_device_key(group_key, device_id):
    digest = hmac.new(base64.b64decode(group_key), device_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def start_hub(tmp_path, fmt, codec):
    state, out = tmp_path / "state", tmp_path / "capture"
    log = open(tmp_path / "hub.log", "wb")
    process = subprocess.Popen(
        [
            str(_hub_binary()), "hub", "--state-dir", str(state), "--mqtt-port", "0", "--api-port", "0",
            "--auto-register", "--capture", str(out), "--capture-format", fmt, "--capture-codec", codec,
            "--capture-window-secs", "1", "--capture-skip-empty",
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    hub_json = state / "hub.json"
    deadline = time.monotonic() + HUB_START_TIMEOUT
    while not hub_json.exists():
        assert process.poll() is None, "the capture hub exited: {}".format((tmp_path / "hub.log").read_text())
        assert time.monotonic() < deadline, "no hub.json"
        time.sleep(0.1)
    info = json.loads(hub_json.read_text())
    return process, info, out


def send_readings(info, device_id, readings):
    key = derive_device_key(info["group_key"], device_id)
    cs = "HostName={};DeviceId={};SharedAccessKey={}".format(info["hostname"], device_id, key)
    restore = _redirect_port_8883(int(info["mqtt_port"]))
    try:
        ca = pathlib.Path(info["ca_file"]).read_text()
        client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=ca)
        call_with_timeout(client.connect, what="connect")
        for reading in readings:
            message = Message(json.dumps(reading))
            message.content_type = "application/json"
            message.content_encoding = "utf-8"
            message.custom_properties["alert"] = "high"
            call_with_timeout(client.send_message, message, what="send_message")
        call_with_timeout(client.shutdown, what="shutdown")
    finally:
        restore()


def capture_files(out):
    return sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_fastavro(path):
    import fastavro

    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        schema = json.loads(reader.metadata["avro.schema"])
        return schema, reader.codec, list(reader)


def read_avro(path):
    from avro.datafile import DataFileReader
    from avro.io import DatumReader

    with open(path, "rb") as f:
        reader = DataFileReader(f, DatumReader())
        schema = json.loads(reader.get_meta("avro.schema"))
        # No avro.codec in the header means null (the Avro spec); apache-avro writes none for null.
        codec = (reader.get_meta("avro.codec") or b"null").decode()
        records = list(reader)
        reader.close()
        return schema, codec, records


@pytest.mark.parametrize("codec", ["deflate", "null"])
@pytest.mark.parametrize("fmt", ["eventhubs", "iothub"])
def test_python_avro_readers_read_every_field_of_our_capture_files(tmp_path, fmt, codec):
    process, info, out = start_hub(tmp_path, fmt, codec)
    try:
        assert info["capture"]["format"] == fmt and info["capture"]["codec"] == codec
        readings = [{"id": "dev-1", "n": n, "temperature": 20.5 + n} for n in range(3)]
        started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        send_readings(info, "dev-1", readings)

        def all_records():
            return [r for p in capture_files(out) for r in read_fastavro(p)[2]]

        wait_for(lambda: len(all_records()) >= 3, timeout=20, what="3 captured records")
        ended = datetime.datetime.now(datetime.timezone.utc)
        files = capture_files(out)
        records = []
        for path in files:
            rel = path.relative_to(out).as_posix()
            if fmt == "eventhubs":
                assert re.fullmatch(r"simdevice/localhost/\d+/\d{4}/\d\d/\d\d/\d\d/\d\d/\d\d(_\d+)?\.avro", rel), rel
            else:
                assert re.fullmatch(r"localhost/\d+/\d{4}/\d\d/\d\d/\d\d/\d\d(_\d+)?", rel), rel
            fast_schema, fast_codec, fast_records = read_fastavro(path)
            avro_schema, avro_codec, avro_records = read_avro(path)
            for schema in (fast_schema, avro_schema):
                if fmt == "eventhubs":
                    assert (schema["name"], schema["namespace"]) == ("EventData", "Microsoft.ServiceBus.Messaging")
                    assert [(f["name"], f["type"]) for f in schema["fields"]] == EVENTHUBS_FIELDS
                else:
                    assert (schema["name"], schema["namespace"]) == ("Message", "Microsoft.Azure.Devices")
                    assert [(f["name"], f["type"]) for f in schema["fields"]] == IOTHUB_FIELDS
            assert fast_codec == codec and avro_codec == codec
            assert fast_records == avro_records, "the two readers agree"
            records.extend(fast_records)
        assert len(records) == 3

        for reading, record in zip(readings, records):
            assert json.loads(record["Body"]) == reading
            assert record["Properties"] == {"alert": "high"}
            system = record["SystemProperties"]
            if fmt == "eventhubs":
                assert isinstance(record["SequenceNumber"], int)
                # The event's byte position in its partition, as the Event Hubs endpoint says.
                assert record["Offset"].isdigit()
                assert system["x-opt-offset"] == record["Offset"]
                enqueued = datetime.datetime.strptime(record["EnqueuedTimeUtc"], "%m/%d/%Y %I:%M:%S %p").replace(
                    tzinfo=datetime.timezone.utc
                )
                assert started - datetime.timedelta(seconds=1) <= enqueued <= ended
                assert system["iothub-connection-device-id"] == "dev-1"
                assert system["content-type"] == "application/json"
                assert system["content-encoding"] == "utf-8"
                assert system["x-opt-enqueued-time"] // 1000 == int(enqueued.timestamp())
                assert system["x-opt-sequence-number"] == record["SequenceNumber"]
            else:
                text = record["EnqueuedTimeUtc"]
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", text), text
                enqueued = datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(
                    tzinfo=datetime.timezone.utc
                )
                assert started - datetime.timedelta(seconds=1) <= enqueued <= ended
                assert system["connectionDeviceId"] == "dev-1"
                assert system["enqueuedTime"] == text
                assert json.loads(system["connectionAuthMethod"])["type"] == "sas"
                assert system["connectionDeviceGenerationId"].isdigit()
                assert system["contentType"] == "application/json"
                assert system["contentEncoding"] == "utf-8"
        if fmt == "eventhubs":
            # One device, so one partition: numbered from 0 in a new hub, offsets growing.
            sequence = [r["SequenceNumber"] for r in records]
            assert sequence == [0, 1, 2], sequence
            offsets = [int(r["Offset"]) for r in records]
            assert offsets == sorted(set(offsets)), "offsets grow"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
