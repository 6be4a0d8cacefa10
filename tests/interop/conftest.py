"""Interop suite: the official Azure IoT Python SDKs against `simdevice hub`.

The hub is started once per test session as a subprocess (the CLI contract):

    simdevice hub --state-dir DIR --mqtt-port 0 --api-port 0 --ws-port 0

It writes DIR/hub.json once it listens:
    {"hostname": "localhost", "mqtt_port": N, "api_port": M, "ca_file": "/abs/ca.pem",
     "service_connection_string": "HostName=localhost:M;SharedAccessKeyName=iothubowner;SharedAccessKey=..."}

How the SDKs are pointed at it:
  * service SDK (azure-iot-hub): calls https://<HostName from the connection string>; the local CA
    is trusted through REQUESTS_CA_BUNDLE (set here, overriding any inherited value);
  * device SDK (azure-iot-device): always connects to port 8883, so paho's Client.connect is
    patched to use the hub's mqtt_port instead; the CA is passed as server_verification_cert.

Recent telemetry is read back through a simdevice extension of the service API (not part of
Azure IoT Hub): GET /simdevice/events?deviceId=ID&api-version=2021-04-12, authorised with the
service SAS like any other service call, returning a JSON array of
{"deviceId", "enqueuedTime", "systemProperties": {...}, "properties": {...}, "body": ...}.

SDK calls that can block forever (the device SDK has no timeouts of its own on sends, twin
requests or subscriptions) go through `call_with_timeout`, and every test carries a
pytest-timeout limit as the last line of defence.
"""

import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as paho_client
import pytest
import requests

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HUB_START_TIMEOUT = 30.0
TEST_TIMEOUT = 120  # seconds, per test (pytest-timeout)
SDK_CALL_TIMEOUT = 20.0  # seconds, per blocking SDK call
API_VERSION = "2021-04-12"


# ---------------------------------------------------------------------------------------------
# generic helpers


class CallTimedOut(AssertionError):
    pass


def call_with_timeout(fn, *args, timeout=SDK_CALL_TIMEOUT, what=None, **kwargs):
    """Run fn(*args, **kwargs) in a daemon thread; re-raise its exception, fail on timeout.

    A daemon thread is used (not a ThreadPoolExecutor) so a call stuck forever inside an SDK
    cannot keep the interpreter from exiting.
    """
    result = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="sdk-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CallTimedOut(
            "{} did not complete within {:.0f} s".format(what or getattr(fn, "__name__", fn), timeout)
        )
    if "error" in result:
        raise result["error"]
    return result.get("value")


def wait_for(predicate, timeout=15.0, interval=0.2, what="condition"):
    """Poll predicate() until it returns a truthy value; return that value or fail."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after {:.0f} s waiting for {} (last value: {!r})".format(timeout, what, last))


def unique_id(prefix):
    return "{}-{}".format(prefix, uuid.uuid4().hex[:10])


def parse_connection_string(cs):
    return dict(part.split("=", 1) for part in cs.split(";") if part)


def service_sas(connection_string, ttl=3600):
    """The Authorization header value the service SDK itself would send."""
    from azure.iot.hub.sastoken import SasToken

    parts = parse_connection_string(connection_string)
    return str(SasToken(parts["HostName"], parts["SharedAccessKey"], parts["SharedAccessKeyName"], ttl))


def http_error_status(exc):
    """The HTTP status carried by an azure-iot-hub (msrest) HttpOperationError."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def http_error_text(exc):
    response = getattr(exc, "response", None)
    text = getattr(response, "text", "") or ""
    headers = getattr(response, "headers", {}) or {}
    return text + " " + " ".join("{}={}".format(k, v) for k, v in headers.items())


# ---------------------------------------------------------------------------------------------
# pytest-timeout on every test


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When an SDK call fails on an HTTP status, show the request and the hub's whole answer.

    msrest's own message is only "Operation returned an invalid status code 'Not Found'".
    """
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None:
        return
    response = getattr(call.excinfo.value, "response", None)
    request = getattr(response, "request", None)
    if response is None or request is None or not hasattr(response, "status_code"):
        return
    body = request.body.decode(errors="replace") if isinstance(request.body, bytes) else request.body
    report.sections.append(
        (
            "HTTP exchange with the hub",
            "{} {}\nrequest body: {}\n-> {} {}\nresponse headers: {}\nresponse body: {}".format(
                request.method,
                request.url,
                body,
                response.status_code,
                getattr(response, "reason", ""),
                dict(response.headers),
                (response.text or "")[:2000],
            ),
        )
    )


# ---------------------------------------------------------------------------------------------
# the hub process


class Hub:
    def __init__(self, info, state_dir, process, log_path):
        self.info = info
        self.state_dir = state_dir
        self.process = process
        self.log_path = log_path
        self.hostname = info["hostname"]
        self.mqtt_port = int(info["mqtt_port"])
        self.api_port = int(info["api_port"])
        self.ws_port = int(info.get("ws_port", 0))
        self.ca_file = info["ca_file"]
        self.service_connection_string = info["service_connection_string"]

    @property
    def ca_pem(self):
        with open(self.ca_file) as f:
            return f.read()

    @property
    def api_base(self):
        return "https://{}:{}".format(self.hostname, self.api_port)

    def device_connection_string(self, device_id, key):
        return "HostName={};DeviceId={};SharedAccessKey={}".format(self.hostname, device_id, key)

    def service_connection_string_with_key(self, key):
        parts = parse_connection_string(self.service_connection_string)
        return "HostName={};SharedAccessKeyName={};SharedAccessKey={}".format(
            parts["HostName"], parts["SharedAccessKeyName"], key
        )

    def stderr_tail(self, limit=4000):
        try:
            return pathlib.Path(self.log_path).read_text(errors="replace")[-limit:]
        except OSError:
            return "<no hub log>"

    def recent_events(self, device_id):
        """simdevice extension: the hub's buffer of recent device-to-cloud messages."""
        response = requests.get(
            self.api_base + "/simdevice/events",
            params={"deviceId": device_id, "api-version": API_VERSION},
            headers={"Authorization": service_sas(self.service_connection_string)},
            verify=self.ca_file,
            timeout=10,
        )
        assert response.status_code == 200, "GET /simdevice/events -> {} {}".format(
            response.status_code, response.text[:500]
        )
        events = response.json()
        assert isinstance(events, list), "events endpoint must return a JSON array, got {!r}".format(events)
        return events


def _hub_binary():
    configured = os.environ.get("SIMDEVICE_BIN", "target/debug/simdevice")
    path = pathlib.Path(configured)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


def _stop(process, grace=10.0):
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    binary = _hub_binary()
    if not binary.exists():
        pytest.fail("hub binary not found at {} (set SIMDEVICE_BIN or run cargo build)".format(binary))
    state_dir = tmp_path_factory.mktemp("hub-state")
    log_path = state_dir.parent / (state_dir.name + "-hub.log")
    log = open(log_path, "wb")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    process = subprocess.Popen(
        [str(binary), "hub", "--state-dir", str(state_dir), "--mqtt-port", "0", "--api-port", "0",
         "--ws-port", "0",
         # The Event Hubs-compatible endpoint (test_eventhub.py): free ports, as the others.
         "--amqp-port", "0", "--amqp-plain-port", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    hub_json = state_dir / "hub.json"
    deadline = time.monotonic() + HUB_START_TIMEOUT
    info = None
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.flush()
                pytest.fail(
                    "simdevice hub exited with code {} before writing hub.json; its output:\n{}".format(
                        process.returncode, pathlib.Path(log_path).read_text(errors="replace")[-4000:]
                    )
                )
            if hub_json.exists():
                try:
                    info = json.loads(hub_json.read_text())
                    break
                except ValueError:
                    pass  # being written; try again
            time.sleep(0.1)
        if info is None:
            log.flush()
            pytest.fail(
                "simdevice hub did not write {} within {:.0f} s; its output:\n{}".format(
                    hub_json, HUB_START_TIMEOUT, pathlib.Path(log_path).read_text(errors="replace")[-4000:]
                )
            )
        for key in ("hostname", "mqtt_port", "api_port", "ca_file", "service_connection_string"):
            assert key in info, "hub.json lacks {!r}: {!r}".format(key, info)
        # The service SDK (requests) trusts the hub's CA through this variable; override whatever
        # the environment had so a corporate bundle cannot mask a wrong certificate.
        os.environ["REQUESTS_CA_BUNDLE"] = info["ca_file"]
        os.environ.pop("CURL_CA_BUNDLE", None)
        restore_connect = _redirect_port_8883(int(info["mqtt_port"]))
        try:
            yield Hub(info, state_dir, process, log_path)
        finally:
            restore_connect()
    finally:
        _stop(process)
        log.close()


def _redirect_port_8883(mqtt_port):
    """azure-iot-device always dials port 8883: send those connects to the hub's MQTT port.

    Only the port changes; the host name stays 'localhost', so the TLS host-name check is still
    exercised. Returns the function that undoes the patch.
    """
    original = paho_client.Client.connect

    def connect(self, host, port=1883, *args, **kwargs):
        if port == 8883:
            port = mqtt_port
        return original(self, host, port, *args, **kwargs)

    paho_client.Client.connect = connect

    def restore():
        paho_client.Client.connect = original

    return restore


# ---------------------------------------------------------------------------------------------
# service SDK side


@pytest.fixture(scope="session")
def registry_manager(hub):
    from azure.iot.hub import IoTHubRegistryManager

    return IoTHubRegistryManager.from_connection_string(hub.service_connection_string)


@pytest.fixture
def make_device(hub, registry_manager):
    """Create devices through the service SDK (keys generated by the hub); delete them after."""
    created = []

    def make(prefix="dev", status="enabled"):
        device_id = unique_id(prefix)
        device = call_with_timeout(
            registry_manager.create_device_with_sas, device_id, "", "", status, what="create_device_with_sas"
        )
        created.append(device_id)
        key = device.authentication.symmetric_key.primary_key
        assert key, "the hub must generate a primary key when the request leaves it empty"
        return device_id, device, hub.device_connection_string(device_id, key)

    yield make
    for device_id in created:
        try:
            call_with_timeout(registry_manager.delete_device, device_id, timeout=10)
        except Exception:  # noqa: BLE001 - best-effort cleanup; the device may already be gone
            pass


# ---------------------------------------------------------------------------------------------
# device SDK side


@pytest.fixture
def device_client_factory(hub):
    """Build IoTHubDeviceClients that trust the hub's CA; shut them all down after the test."""
    from azure.iot.device import IoTHubDeviceClient

    clients = []

    def factory(connection_string, **kwargs):
        kwargs.setdefault("server_verification_cert", hub.ca_pem)
        client = IoTHubDeviceClient.create_from_connection_string(connection_string, **kwargs)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        try:
            call_with_timeout(client.shutdown, timeout=10, what="client.shutdown")
        except Exception:  # noqa: BLE001 - teardown must not mask the test's own result
            pass
