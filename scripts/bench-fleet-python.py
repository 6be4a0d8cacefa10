#!/usr/bin/env python3
"""The anchor of scripts/bench-fleet: COUNT devices in ONE process with the official Python
device SDK (azure-iot-device, one IoTHubDeviceClient each), doing what a device of
`simdevice fleet` does, against the same local hub (`simdevice hub --auto-register`):

  connect (MQTT over TLS, SAS from a key derived from the hub's group key), report
  connectivity in the twin, answer direct methods (lockDoor -> 200), and send one JSON reading
  every INTERVAL seconds (QoS 1, content type application/json), until SIGTERM.

    bench-fleet-python.py HUB_JSON PREFIX COUNT [INTERVAL]

Device ids are PREFIX + 1..COUNT, zero-padded to the width of COUNT. Each key is derived as the
hub's auto-register expects (the DPS group-enrollment derivation):
base64(HMAC-SHA256(key = base64decode(group_key), msg = device_id)).

The devices connect one after another (each connect() returns on CONNACK and the reported patch
on the hub's answer); then "connected N" goes to stdout. The readings of one round are spread
evenly over the interval, sent from the main thread (send_message returns on PUBACK), each
followed by "acknowledged TOTAL" on stdout. A device that fails to connect is named on stderr
("connect failed ID: ERROR") and left out; the exit code is 1 when none connected.

The SDK always dials port 8883: paho's connect is pointed at the hub's port, as
tests/interop/conftest.py and scripts/bench-agent-python-device.py do; nothing else is changed.
"""
import base64
import hashlib
import hmac
import json
import random
import signal
import sys
import threading
import time

import paho.mqtt.client as paho_client
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

HUB_JSON, PREFIX, COUNT = sys.argv[1], sys.argv[2], int(sys.argv[3])
INTERVAL = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0

with open(HUB_JSON) as f:
    hub = json.load(f)
MQTT_PORT = int(hub["mqtt_port"])
original_connect = paho_client.Client.connect


def connect(self, host, port=1883, *args, **kwargs):
    return original_connect(self, host, MQTT_PORT if port == 8883 else port, *args, **kwargs)


paho_client.Client.connect = connect

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())

with open(hub["ca_file"]) as f:
    ca = f.read()
group_key = base64.b64decode(hub["group_key"])


def device_key(device_id):
    return base64.b64encode(
        hmac.new(group_key, device_id.encode(), hashlib.sha256).digest()).decode()


def method_handler(client):
    def on_method(request):
        status = 200 if request.name == "lockDoor" else 404
        client.send_method_response(MethodResponse.create_from_method_request(request, status, {}))
    return on_method


width = len(str(COUNT))
clients = []
for n in range(1, COUNT + 1):
    if stop.is_set():
        break
    device_id = f"{PREFIX}{n:0{width}d}"
    cs = f"HostName={hub['hostname']};DeviceId={device_id};SharedAccessKey={device_key(device_id)}"
    client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=ca)
    client.on_method_request_received = method_handler(client)
    try:
        client.connect()
        client.patch_twin_reported_properties(
            {"connectivity": {"type": "cellular", "signalStrength": -71, "network": "LTE"}})
    except Exception as error:  # the SDK raises its own hierarchy; name it and go on
        print(f"connect failed {device_id}: {error!r}", file=sys.stderr, flush=True)
        try:
            client.shutdown()
        except Exception:
            pass
        continue
    clients.append(client)
print(f"connected {len(clients)}", flush=True)
if not clients:
    sys.exit(1)

sent = 0
state = [(21.0 + random.uniform(-1, 1), 45.0 + random.uniform(-3, 3)) for _ in clients]
t0 = time.monotonic()
step = INTERVAL / len(clients)
round_no = 0
while not stop.is_set():
    for i, client in enumerate(clients):
        if stop.wait(max(0.0, t0 + round_no * INTERVAL + i * step - time.monotonic())):
            break
        temperature, humidity = state[i]
        temperature += random.uniform(-0.1, 0.1)
        humidity += random.uniform(-0.2, 0.2)
        state[i] = (temperature, humidity)
        message = Message(json.dumps({"temperature": round(temperature, 2),
                                      "humidity": round(humidity, 2), "uv": 3, "seq": round_no}))
        message.content_type = "application/json"
        message.content_encoding = "utf-8"
        try:
            client.send_message(message)
        except Exception as error:
            print(f"send failed {i}: {error!r}", file=sys.stderr, flush=True)
            continue
        sent += 1
        print(f"acknowledged {sent}", flush=True)
    round_no += 1
for client in clients:
    try:
        client.shutdown()
    except Exception:
        pass
