"""pytest plugin (loaded with `-p simdevice_ms_e2e` by scripts/ms-e2e): Microsoft's device SDK
end-to-end suite (`tests/e2e/iothub_e2e` of Azure/azure-iot-sdk-python) against `simdevice hub`.

The suite is written for a hub in Azure: every client dials its protocol's well-known port
(8883, 5671) on the host name of IOTHUB_CONNECTION_STRING. The local hub listens on free ports,
and the suite gives no hook for a port, so this plugin patches, in-process and nothing else:

  * paho-mqtt `Client.connect` (the device SDK's MQTT): the host name the SDK takes from the
    connection string is the service's `localhost:API_PORT` (the service SDK needs the port in
    HostName, and the suite builds device connection strings from that HostName); the `:PORT`
    is cut off the TCP/TLS host (so the certificate check still sees `localhost`) and port 8883
    becomes the hub's MQTT port. The MQTT user name and SAS audience keep `localhost:API_PORT`,
    which the hub accepts as one of its names, as IoT Hub accepts its own host name.
  * azure-eventhub `EventHubConsumerClient.from_connection_string` (ServiceHelperSync's
    receiver on EVENTHUB_CONNECTION_STRING): adds `custom_endpoint_address` (the hub's AMQP
    port; azure-eventhub ignores a port in `Endpoint=`) and `connection_verify` (the hub's CA),
    unless the caller gave them.
  * uamqp `JWTTokenAuth.__init__` (azure-iot-hub's `send_c2d_message`): `port` becomes the
    hub's AMQP port and `verify` the hub's CA (uamqp trusts only certifi's bundle), unless given.
  * dev_utils.iptables (the suite's dropped-connection helper), only where iptables cannot be
    run: `reconnect_all` (called before every test) becomes a no-op and the tests marked
    `dropped_connection` / `uses_iptables` are skipped, saying why. Where it can be run, its
    port becomes the hub's MQTT port and `get_ip` ignores the `:PORT` of the host name, so the
    rules drop the hub's traffic as they would drop Azure's.

The device SDK and the service SDK's REST calls trust the hub's CA through SSL_CERT_FILE and
REQUESTS_CA_BUNDLE, set by scripts/ms-e2e (no patch). No file of Microsoft's is changed.

Reads the hub's hub.json from SIMDEVICE_HUB_JSON; SIMDEVICE_MQTT_PORT, when set, replaces its
MQTT port (scripts/ms-e2e's delay relay, MS_E2E_MQTT_DELAY_MS).
"""

import json
import os
import shutil
import subprocess

import pytest

_INFO = None
_IPTABLES_USABLE = None


def _hub():
    global _INFO
    if _INFO is None:
        path = os.environ.get("SIMDEVICE_HUB_JSON")
        if not path:
            raise pytest.UsageError("SIMDEVICE_HUB_JSON is not set: run the suite through scripts/ms-e2e")
        with open(path) as f:
            _INFO = json.load(f)
    return _INFO


def _split_host(host):
    """'localhost:1234' -> 'localhost'; a bare name or an IPv6 literal is left as it is."""
    if host.count(":") == 1:
        name, port = host.split(":")
        if port.isdigit():
            return name
    return host


def _patch_paho(mqtt_port):
    import paho.mqtt.client as paho_client

    original = paho_client.Client.connect

    def connect(self, host, port=1883, *args, **kwargs):
        if port == 8883:
            port = mqtt_port
        return original(self, _split_host(host), port, *args, **kwargs)

    paho_client.Client.connect = connect


def _patch_eventhub(amqp_port, ca_file):
    from azure.eventhub import EventHubConsumerClient

    original = EventHubConsumerClient.from_connection_string.__func__

    def from_connection_string(cls, conn_str, **kwargs):
        kwargs.setdefault("custom_endpoint_address", "sb://localhost:{}".format(amqp_port))
        kwargs.setdefault("connection_verify", ca_file)
        return original(cls, conn_str, **kwargs)

    EventHubConsumerClient.from_connection_string = classmethod(from_connection_string)


def _patch_uamqp(amqp_port, ca_file):
    from uamqp.authentication import JWTTokenAuth

    original = JWTTokenAuth.__init__

    def init(self, audience, uri, get_token, *args, **kwargs):
        kwargs["port"] = kwargs.get("port") or amqp_port
        kwargs["verify"] = kwargs.get("verify") or ca_file
        original(self, audience, uri, get_token, *args, **kwargs)

    JWTTokenAuth.__init__ = init


def _iptables_usable():
    """Whether the suite's `iptables -L` (or `sudo -n iptables -L`) would run here."""
    global _IPTABLES_USABLE
    if _IPTABLES_USABLE is None:
        command = ["iptables", "-L", "OUTPUT", "-n"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            command = ["sudo", "-n"] + command
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=10)
            _IPTABLES_USABLE = True
        except (OSError, subprocess.SubprocessError):
            _IPTABLES_USABLE = False
    return _IPTABLES_USABLE


def _patch_iptables(mqtt_port):
    from dev_utils import iptables

    if _iptables_usable():
        iptables.mqtt_port = mqtt_port
        original_get_ip = iptables.get_ip
        iptables.get_ip = lambda host: original_get_ip(_split_host(host))
    else:
        iptables.reconnect_all = lambda transport, host: None


def _install():
    info = _hub()
    # SIMDEVICE_MQTT_PORT: where the device SDK dials instead of the hub's own MQTT port (set by
    # scripts/ms-e2e to its delay relay under MS_E2E_MQTT_DELAY_MS); the iptables rules follow it.
    mqtt_port = int(os.environ.get("SIMDEVICE_MQTT_PORT") or info["mqtt_port"])
    _patch_paho(mqtt_port)
    _patch_eventhub(int(info["amqp_port"]), info["ca_file"])
    _patch_uamqp(int(info["amqp_port"]), info["ca_file"])
    _patch_iptables(mqtt_port)


# At import, not in pytest_configure: the suite's conftest (through drop_fixtures) calls
# iptables.reconnect_all as it is imported, which is before any pytest_configure runs; a plugin
# given with -p is imported before the conftest files.
_install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _iptables_usable():
        return
    for marker in ("dropped_connection", "uses_iptables"):
        if item.get_closest_marker(marker) is not None:
            pytest.skip("marked {}: iptables cannot be run here (needs iptables and root)".format(marker))
