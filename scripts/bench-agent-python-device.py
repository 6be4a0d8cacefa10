#!/usr/bin/env python3
"""The anchor of scripts/bench-agent: ONE device with the official Python device SDK
(azure-iot-device), doing what `simdevice run` does at its defaults, against the same hub:

  connect (MQTT over TLS, SAS from the connection string), report connectivity in the twin,
  answer direct methods (lockDoor -> 200), and send one JSON reading every INTERVAL seconds
  (QoS 1, content type application/json), until SIGTERM.

    bench-agent-python-device.py CONNECTION_STRING CA_FILE MQTT_PORT [INTERVAL]

Prints "acknowledged N" on stdout after each reading the SDK reports sent (its send_message
returns on PUBACK). The SDK always dials port 8883: paho's connect is pointed at MQTT_PORT,
as tests/interop/conftest.py does, and the connection string's GatewayHostName is dropped;
nothing else is changed.
"""
import json
import random
import signal
import sys
import threading
import time

import paho.mqtt.client as paho_client
from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

CS, CA_FILE, MQTT_PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
# The SDK would dial a GatewayHostName as given ("localhost:PORT" is no host name): drop it;
# the port comes from the redirect below, the host from HostName.
CS = ";".join(p for p in CS.split(";") if not p.startswith("GatewayHostName="))
INTERVAL = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0

original_connect = paho_client.Client.connect


def connect(self, host, port=1883, *args, **kwargs):
    return original_connect(self, host, MQTT_PORT if port == 8883 else port, *args, **kwargs)


paho_client.Client.connect = connect

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())

with open(CA_FILE) as f:
    ca = f.read()
client = IoTHubDeviceClient.create_from_connection_string(CS, server_verification_cert=ca)


def on_method(request):
    status = 200 if request.name == "lockDoor" else 404
    client.send_method_response(MethodResponse.create_from_method_request(request, status, {}))


client.on_method_request_received = on_method
client.connect()
client.patch_twin_reported_properties(
    {"connectivity": {"type": "cellular", "signalStrength": -71, "network": "LTE"}}
)
sent = 0
temperature, humidity = 21.0, 45.0
while not stop.is_set():
    temperature += random.uniform(-0.1, 0.1)
    humidity += random.uniform(-0.2, 0.2)
    message = Message(json.dumps({"temperature": round(temperature, 2),
                                  "humidity": round(humidity, 2), "uv": 3, "seq": sent}))
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    client.send_message(message)
    sent += 1
    print(f"acknowledged {sent}", flush=True)
    stop.wait(INTERVAL)
client.shutdown()
