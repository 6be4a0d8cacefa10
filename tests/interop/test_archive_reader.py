"""`simdevice archive to-csv` reads Avro files that another implementation wrote.

fastavro (not our apache-avro) writes Event Hubs Capture files with the schema Microsoft
documents ("Explore captured Avro files", the avro-tools getschema output), with codecs null and
deflate, the union-typed maps holding a long, a double, a string and bytes, and a null Body;
and one IoT Hub routing (`Microsoft.Azure.Devices.Message`) file. Our reader must turn them into
the CSV files the walkthrough expects. No hub is needed: only the binary (SIMDEVICE_BIN).
"""

import csv
import json
import subprocess

import fastavro
import pytest

from conftest import _hub_binary

# Microsoft's documented Capture schema, verbatim.
CAPTURE_SCHEMA = {
    "type": "record",
    "name": "EventData",
    "namespace": "Microsoft.ServiceBus.Messaging",
    "fields": [
        {"name": "SequenceNumber", "type": "long"},
        {"name": "Offset", "type": "string"},
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}

ROUTING_SCHEMA = {
    "type": "record",
    "name": "Message",
    "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}


def capture_record(seq, device, reading):
    return {
        "SequenceNumber": seq,
        "Offset": str(seq * 4096),
        "EnqueuedTimeUtc": "12/2/2021 2:58:{:02d} PM".format(seq),
        "SystemProperties": {
            "x-opt-sequence-number": seq,  # long
            "x-opt-offset": str(seq * 4096),  # string
            "x-opt-enqueued-time": 1638457104000 + seq,  # long
            "iothub-connection-device-id": device,  # string
            "iothub-connection-auth-generation-id": b"637741234567890123",  # bytes
            "x-test-weight": 0.25,  # double
        },
        "Properties": {"source": b"sensor"},
        "Body": None if reading is None else json.dumps(reading).encode("utf-8"),
    }


def reading(device, n):
    return {
        "id": device,
        "timestamp": "2021-12-02T14:58:{:02d}Z".format(n),
        "uv": n,
        "temperature": 20.0 + n / 2,
        "humidity": 40 + n,
        "location": "bay, 3",
    }


def write(path, schema, records, codec):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        fastavro.writer(out, fastavro.parse_schema(schema), records, codec=codec)


def to_csv(source, out, *extra):
    binary = _hub_binary()
    if not binary.exists():
        pytest.fail("simdevice binary not found at {} (set SIMDEVICE_BIN or run cargo build)".format(binary))
    return subprocess.run(
        [str(binary), "archive", "to-csv", str(source), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("codec", ["null", "deflate"])
def test_reads_capture_files_written_by_fastavro(tmp_path, codec):
    source, out = tmp_path / "capture", tmp_path / "csv"
    partition = source / "ns" / "hub" / "0" / "2021" / "12" / "02" / "14"
    write(
        partition / "58" / "00.avro",
        CAPTURE_SCHEMA,
        [
            capture_record(1, "dev-1", reading("sensor-1", 1)),
            capture_record(2, "dev-2", reading("sensor-2", 1)),
            capture_record(3, "dev-1", None),  # Body null: reported, skipped
        ],
        codec,
    )
    write(partition / "59" / "00.avro", CAPTURE_SCHEMA, [capture_record(4, "dev-1", reading("sensor-1", 2))], codec)
    # An empty window, as Capture writes it without skipEmptyArchives.
    (partition / "59" / "30.avro").write_bytes(b"")

    result = to_csv(source, out, "--delete")
    assert result.returncode == 1, result.stderr  # the null Body was skipped
    assert "record=2 reason=Body is null" in result.stderr, result.stderr
    assert "2 files read, 3 rows written, 1 records skipped, 1 empty files, 3 files deleted" in result.stderr

    header = ["id", "timestamp", "uv", "temperature", "humidity", "location"]
    assert rows(out / "sensor-1.csv") == [
        header,
        ["sensor-1", "2021-12-02T14:58:01Z", "1", "20.5", "41", "bay, 3"],
        ["sensor-1", "2021-12-02T14:58:02Z", "2", "21.0", "42", "bay, 3"],
    ]
    assert rows(out / "sensor-2.csv") == [header, ["sensor-2", "2021-12-02T14:58:01Z", "1", "20.5", "41", "bay, 3"]]
    assert not list(source.rglob("*.avro")), "--delete left files behind"


@pytest.mark.parametrize("codec", ["null", "deflate"])
def test_groups_by_device_id_from_the_union_typed_system_properties(tmp_path, codec):
    source, out = tmp_path / "capture", tmp_path / "csv"
    write(
        source / "ns" / "hub" / "1" / "2021" / "12" / "02" / "14" / "58" / "00.avro",
        CAPTURE_SCHEMA,
        [capture_record(1, "dev-1", reading("a", 1)), capture_record(2, "dev-1", reading("b", 2))],
        codec,
    )
    result = to_csv(source, out, "--by", "device")
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in rows(out / "dev-1.csv")] == ["id", "a", "b"]


def test_reads_a_routing_file_written_by_fastavro(tmp_path):
    source, out = tmp_path / "routing", tmp_path / "csv"
    record = {
        "EnqueuedTimeUtc": "2018-06-11T00:00:08.2250000Z",
        "Properties": {},
        "SystemProperties": {
            "connectionDeviceId": "dev-7",
            "connectionAuthMethod": '{"scope":"device","type":"sas","issuer":"iothub"}',
            "connectionDeviceGenerationId": "636641354612345678",
            "enqueuedTime": "2018-06-11T00:00:08.2250000Z",
            "contentType": "application/json",
            "contentEncoding": "utf-8",
        },
        "Body": json.dumps({"id": "dev-7", "uv": 5}).encode(),
    }
    write(source / "myhub" / "0" / "2018" / "06" / "11" / "00" / "00.avro", ROUTING_SCHEMA, [record], "deflate")
    result = to_csv(source, out, "--by", "device")
    assert result.returncode == 0, result.stderr
    assert rows(out / "dev-7.csv") == [["id", "uv"], ["dev-7", "5"]]
