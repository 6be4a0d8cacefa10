"""The official Node.js provisioning client (azure-iot-provisioning-device 1.9 with its MQTT
transport, symmetric key) against the hub's local DPS.

The transport dials `mqtts://{provisioningHost}`, so the host may carry the DPS port
(`localhost:{dps_port}`); it has no CA option, so the hub's CA comes through Node's
NODE_EXTRA_CA_CERTS. tests/node-dps holds the script and its lock file (installed with
`npm ci --prefix tests/node-dps`). The device it registers then connects with the Python
`IoTHubDeviceClient`.
"""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT, call_with_timeout, unique_id, wait_for
from test_dps import derive_device_key, dps_request

NODE_DPS = REPO_ROOT / "tests" / "node-dps"


def node_register(hub, registration_id, key):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    assert (NODE_DPS / "node_modules").is_dir(), "run `npm ci --prefix tests/node-dps` first"
    env = dict(os.environ)
    env.update(
        {
            "DPS_HOST": "localhost:{}".format(hub.info["dps_port"]),
            "ID_SCOPE": hub.info["id_scope"],
            "REGISTRATION_ID": registration_id,
            "DEVICE_KEY": key,
            "NODE_EXTRA_CA_CERTS": hub.ca_file,
        }
    )
    return subprocess.run(
        ["node", str(NODE_DPS / "register.js")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_the_node_client_registers_from_a_group_and_the_device_connects(hub, device_client_factory):
    from azure.iot.device import Message

    group_id = unique_id("node-group")
    put = dps_request(hub, "PUT", "/enrollmentGroups/" + group_id, {"attestation": {"type": "symmetricKey"}})
    assert put.status_code == 200, put.text
    registration_id = unique_id("node-dev")
    key = derive_device_key(put.json()["attestation"]["symmetricKey"]["primaryKey"], registration_id)

    done = node_register(hub, registration_id, key)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["assignedHub"] == "localhost", result
    assert result["deviceId"] == registration_id, result
    assert result["payload"] == {"client": "node"}, result

    client = device_client_factory(hub.device_connection_string(registration_id, key))
    call_with_timeout(client.connect, what="connect")
    call_with_timeout(client.send_message, Message(json.dumps({"via": "node dps"})), what="send_message")
    wait_for(lambda: hub.recent_events(registration_id), what="the message at the hub")


def test_the_node_client_reports_a_wrong_key(hub):
    registration_id = unique_id("node-nokey")
    put = dps_request(hub, "PUT", "/enrollments/" + registration_id, {"attestation": {"type": "symmetricKey"}})
    assert put.status_code == 200, put.text
    wrong = derive_device_key(put.json()["attestation"]["symmetricKey"]["primaryKey"], "someone-else")
    done = node_register(hub, registration_id, wrong)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "registration failed" in done.stderr, done.stderr
