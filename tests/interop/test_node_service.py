"""Node's service SDK (azure-iothub, tests/node-service) against the local hub: `Client.send`
over AMQP reaches the Python device SDK with its properties, and `getFeedbackReceiver` gets
the Success feedback once the device completes it.

Needs `npm ci --prefix tests/node-service` (as scripts/test does for tests/azurite); without
its node_modules the test is skipped, and says so.
"""

import json
import os
import pathlib
import shutil
import subprocess
import threading
import uuid

import pytest

from conftest import REPO_ROOT, call_with_timeout

NODE_DIR = REPO_ROOT / "tests" / "node-service"


def test_node_client_send_reaches_the_device_and_its_feedback_comes_back(hub, make_device, device_client_factory):
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "azure-iothub").is_dir():
        pytest.skip("azure-iothub for Node is not installed (npm ci --prefix tests/node-service)")
    device_id, _, connection_string = make_device("node-c2d")
    client = device_client_factory(connection_string)
    received = []
    arrived = threading.Event()

    def on_message(message):
        received.append(message)
        arrived.set()

    client.on_message_received = on_message
    call_with_timeout(client.connect)

    message_id = "node-{}".format(uuid.uuid4().hex[:8])
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=hub.ca_file)
    run = subprocess.run(
        ["node", str(NODE_DIR / "send_c2d.js"), str(pathlib.Path(hub.state_dir) / "hub.json"), device_id, message_id],
        capture_output=True,
        text=True,
        timeout=40,
        env=env,
    )
    assert run.returncode == 0, "node: {}\n{}".format(run.stdout, run.stderr[-3000:])
    result = json.loads(run.stdout.strip().splitlines()[-1])

    assert arrived.wait(5), "on_message_received was not called"
    message = received[0]
    assert message.data == b'{"from":"node"}'
    assert message.message_id == message_id
    assert message.correlation_id == "node-corr"
    assert message.ack == "full"
    assert message.custom_properties == {"sdk": "node"}

    assert result["contentType"] == "application/vnd.microsoft.iothub.feedback.json"
    records = [r for r in result["feedback"] if r["originalMessageId"] == message_id]
    assert records and records[0]["statusCode"] == "Success" and records[0]["deviceId"] == device_id, result
