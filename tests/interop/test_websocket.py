"""azure-iot-device 2.14.0 with websockets=True (MQTT over WebSocket, paho's transport) against
simdevice hub's WebSocket listener: telemetry, the twin, a direct method; and the same through
an HTTP CONNECT proxy started here (ProxyOptions(proxy_type="HTTP"), through PySocks).

The SDK dials port 443 for WebSocket: paho's Client.connect is patched (as conftest.py does for
8883) to send those connects to the hub's ws_port, host name unchanged, so the TLS host-name
check and the WebSocket Host header stay as the SDK makes them.
"""

import json
import socket
import threading
import uuid

import paho.mqtt.client as paho_client
import pytest
from azure.iot.device import Message, MethodResponse, ProxyOptions
from azure.iot.hub.models import CloudToDeviceMethod

from conftest import call_with_timeout, wait_for


@pytest.fixture
def websocket_port(hub, monkeypatch):
    """Sends paho's connects to port 443 to the hub's WebSocket port, for this test."""
    assert hub.ws_port, "hub.json must give ws_port"
    original = paho_client.Client.connect

    def connect(self, host, port=1883, *args, **kwargs):
        if port == 443:
            port = hub.ws_port
        return original(self, host, port, *args, **kwargs)

    monkeypatch.setattr(paho_client.Client, "connect", connect)
    return hub.ws_port


class ConnectProxy:
    """A small HTTP CONNECT proxy on 127.0.0.1 that counts the tunnels it opened."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.targets = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="connect-proxy").start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(1)
            if not chunk:
                client.close()
                return
            head += chunk
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _ = request_line.split(" ", 2)
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            client.close()
            return
        host, port = target.rsplit(":", 1)
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            client.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.targets.append(target)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(src, dst):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    def tunnels(self):
        with self.lock:
            return list(self.targets)

    def close(self):
        self.listener.close()


@pytest.fixture
def connect_proxy():
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


def _session(client, device_id, hub, registry_manager):
    """Telemetry, the twin and a direct method over one connected client."""
    call_with_timeout(client.connect, what="IoTHubDeviceClient.connect (websockets)")
    assert client.connected

    message_id = "mid-" + uuid.uuid4().hex
    message = Message(json.dumps({"over": "websocket"}))
    message.message_id = message_id
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    call_with_timeout(client.send_message, message, what="send_message (waits for PUBACK)")

    def find():
        for event in hub.recent_events(device_id):
            if event.get("systemProperties", {}).get("message-id") == message_id:
                return event
        return None

    event = wait_for(find, what="the message in /simdevice/events")
    assert event["body"] == {"over": "websocket"}

    twin = call_with_timeout(client.get_twin, what="get_twin")
    assert "desired" in twin and "reported" in twin
    call_with_timeout(client.patch_twin_reported_properties, {"transport": "websocket"}, what="patch reported")
    reported = call_with_timeout(registry_manager.get_twin, device_id).properties.reported
    assert reported["transport"] == "websocket"

    def on_method(request):
        response = MethodResponse.create_from_method_request(request, 200, {"echo": request.payload})
        client.send_method_response(response)

    call_with_timeout(setattr, client, "on_method_request_received", on_method, what="subscribe to methods")
    result = call_with_timeout(
        registry_manager.invoke_device_method,
        device_id,
        CloudToDeviceMethod(method_name="ping", payload={"n": 1}, response_timeout_in_seconds=10),
        what="invoke_device_method ping",
    )
    assert result.status == 200
    assert result.payload == {"echo": {"n": 1}}


def test_websocket_device_sends_telemetry_reads_its_twin_and_answers_a_method(
    make_device, device_client_factory, hub, registry_manager, websocket_port
):
    device_id, _, connection_string = make_device("ws")
    client = device_client_factory(connection_string, websockets=True)
    _session(client, device_id, hub, registry_manager)


def test_websocket_device_through_an_http_connect_proxy(
    make_device, device_client_factory, hub, registry_manager, websocket_port, connect_proxy
):
    device_id, _, connection_string = make_device("ws-proxy")
    proxy = ProxyOptions(proxy_type="HTTP", proxy_addr="127.0.0.1", proxy_port=connect_proxy.port)
    client = device_client_factory(connection_string, websockets=True, proxy_options=proxy)
    _session(client, device_id, hub, registry_manager)
    tunnels = connect_proxy.tunnels()
    assert tunnels, "the connection went through the proxy"
    assert all(t == "{}:{}".format(hub.hostname, websocket_port) for t in tunnels), tunnels
