"""Reference scenarios 2 and 3 (docs/scenarios.md) end to end.

The service app is the official `azure-iot-hub` SDK; the device is the real agent binary,
`simdevice run --config FILE`, started as a subprocess against the session's `simdevice hub`.

Each test that starts an agent gets it from the `run_agent` fixture, which always stops it with
SIGTERM at teardown and requires a clean exit (code 0) within AGENT_STOP_TIMEOUT seconds; it
also checks that the agent never wrote the device key to its stdout or stderr.
"""

import datetime
import json
import os
import signal
import subprocess
import time

import pytest
from azure.iot.hub import IoTHubJobManager
from azure.iot.hub.models import CloudToDeviceMethod, JobRequest, QuerySpecification, Twin, TwinProperties

from conftest import _hub_binary, call_with_timeout, unique_id, wait_for

AGENT_STOP_TIMEOUT = 15.0  # seconds between SIGTERM and the agent's exit
AGENT_CONNECT_TIMEOUT = 30.0  # seconds for the agent to connect and report its connectivity
EX_CONFIG = 78  # sysexits: the agent refuses its configuration

PLANT_QUERY = "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
CELLULAR_QUERY = (
    "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' "
    "AND properties.reported.connectivity.type = 'cellular'"
)
TERMINAL_JOB_STATES = {"completed", "failed", "cancelled"}


# ---------------------------------------------------------------------------------------------
# helpers


def toml_string(value):
    """A TOML basic string (JSON string syntax is valid TOML for these ASCII values)."""
    return json.dumps(str(value))


def agent_connection_string(hub, device_id, key):
    return "HostName={};DeviceId={};SharedAccessKey={};GatewayHostName=localhost:{}".format(
        hub.hostname, device_id, key, hub.mqtt_port
    )


def agent_config_text(hub, device_id, key, telemetry_extra=""):
    return (
        "[identity]\n"
        "connection_string = {}\n"
        "ca_file = {}\n"
        "\n"
        "[telemetry]\n"
        "interval_secs = 1\n"
        "{}"
    ).format(toml_string(agent_connection_string(hub, device_id, key)), toml_string(hub.ca_file), telemetry_extra)


def agent_env(extra=None):
    """The test's environment without any SIMDEVICE__* override that could change the config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMDEVICE__")}
    env.setdefault("RUST_LOG", "info")
    env.update(extra or {})
    return env


def device_key(device):
    return device.authentication.symmetric_key.primary_key


def query_device_ids(registry_manager, query):
    """All device ids a query returns, following continuation tokens."""
    ids = []
    token = None
    for _ in range(100):
        result = call_with_timeout(
            registry_manager.query_iot_hub, QuerySpecification(query=query), token, None, what=query
        )
        ids.extend(item.device_id for item in result.items)
        token = result.continuation_token
        if not token:
            return ids
    raise AssertionError("query {!r} still had a continuation token after 100 pages".format(query))


def query_rows(registry_manager, query):
    result = call_with_timeout(registry_manager.query_iot_hub, QuerySpecification(query=query), what=query)
    return result


class AgentProcess:
    def __init__(self, device_id, key, config_path, process, stdout_path, stderr_path):
        self.device_id = device_id
        self.key = key
        self.config_path = config_path
        self.process = process
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    def output(self, limit=6000):
        parts = []
        for name, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = "<missing>"
            parts.append("--- agent {} ---\n{}".format(name, text[-limit:]))
        return "\n".join(parts)

    def full_output(self):
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def assert_running(self):
        code = self.process.poll()
        assert code is None, "the agent exited early with code {}\n{}".format(code, self.output())


@pytest.fixture
def run_agent(hub, tmp_path):
    """Start `simdevice run --config FILE` for a device; stop every agent started at teardown."""
    binary = _hub_binary()
    started = []

    def start(device_id, key):
        directory = tmp_path / "agent-{}".format(device_id)
        directory.mkdir()
        config_path = directory / "config.toml"
        config_path.write_text(agent_config_text(hub, device_id, key))
        stdout_path = directory / "stdout.log"
        stderr_path = directory / "stderr.log"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            process = subprocess.Popen(
                [str(binary), "run", "--config", str(config_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                # Each agent keeps its durable outbox and state in its own directory.
                env=agent_env({"STATE_DIRECTORY": str(directory)}),
            )
        agent = AgentProcess(device_id, key, config_path, process, stdout_path, stderr_path)
        started.append(agent)
        return agent

    yield start

    problems = []
    for agent in started:
        process = agent.process
        if process.poll() is not None:
            problems.append(
                "agent {} had already exited with code {} before teardown".format(agent.device_id, process.returncode)
            )
        else:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=AGENT_STOP_TIMEOUT)
                if code != 0:
                    problems.append("agent {} exited with code {} after SIGTERM".format(agent.device_id, code))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
                problems.append(
                    "agent {} did not exit within {:.0f} s of SIGTERM (killed)".format(
                        agent.device_id, AGENT_STOP_TIMEOUT
                    )
                )
        if agent.key and agent.key in agent.full_output():
            problems.append("agent {} wrote its device key to stdout/stderr".format(agent.device_id))
        if problems:
            problems.append(agent.output())
    if problems:
        pytest.fail("\n".join(problems))


def wait_reported(registry_manager, agent, predicate, what, timeout=AGENT_CONNECT_TIMEOUT):
    """Poll the device's twin until predicate(twin) holds; fail fast if the agent exits."""

    def check():
        agent.assert_running()
        twin = call_with_timeout(registry_manager.get_twin, agent.device_id)
        return twin if predicate(twin) else None

    try:
        return wait_for(check, timeout=timeout, interval=0.5, what=what)
    except AssertionError as error:
        raise AssertionError("{}\n{}".format(error, agent.output())) from None


def reported_connectivity_is_cellular(twin):
    connectivity = (twin.properties.reported or {}).get("connectivity")
    return isinstance(connectivity, dict) and connectivity.get("type") == "cellular"


# ---------------------------------------------------------------------------------------------
# scenario 2: tags, connectivity and queries


def test_scenario2_twin_tags_connectivity_and_queries(hub, make_device, registry_manager, run_agent):
    device_id, device, _ = make_device("s2-dev")

    twin = call_with_timeout(registry_manager.get_twin, device_id)
    patch = Twin(tags={"location": {"region": "US", "plant": "Redmond43"}})
    updated = call_with_timeout(registry_manager.update_twin, device_id, patch, twin.etag, what="update_twin tags")
    assert updated.tags["location"] == {"region": "US", "plant": "Redmond43"}

    # Before the device reports: the plant query finds it, the cellular query does not.
    assert device_id in query_device_ids(registry_manager, PLANT_QUERY)
    assert device_id not in query_device_ids(registry_manager, CELLULAR_QUERY)

    agent = run_agent(device_id, device_key(device))

    def in_both():
        agent.assert_running()
        return device_id in query_device_ids(registry_manager, PLANT_QUERY) and device_id in query_device_ids(
            registry_manager, CELLULAR_QUERY
        )

    try:
        wait_for(in_both, timeout=AGENT_CONNECT_TIMEOUT, interval=0.5, what="the device in both query results")
    except AssertionError as error:
        raise AssertionError("{}\n{}".format(error, agent.output())) from None

    twin = call_with_timeout(registry_manager.get_twin, device_id)
    assert twin.tags["location"] == {"region": "US", "plant": "Redmond43"}, "the agent's report must not touch tags"
    assert twin.properties.reported["connectivity"]["type"] == "cellular"
    assert call_with_timeout(registry_manager.get_device, device_id).connection_state == "Connected"


# ---------------------------------------------------------------------------------------------
# scenario 3: jobs (lockDoor and desired properties)


def test_scenario3_jobs_lock_door_and_desired_properties(hub, make_device, registry_manager, run_agent):
    device_id, device, _ = make_device("door")
    agent = run_agent(device_id, device_key(device))
    # Connected, subscribed and caught up: the agent reports its connectivity after the twin GET.
    wait_reported(registry_manager, agent, reported_connectivity_is_cellular, "the agent's connectivity report")

    jobs = IoTHubJobManager.from_connection_string(hub.service_connection_string)
    condition = "deviceId IN ['{}']".format(device_id)
    method_job_id = unique_id("lockjob")
    twin_job_id = unique_id("twinjob")

    method_request = JobRequest(
        job_id=method_job_id,
        type="scheduleDeviceMethod",
        cloud_to_device_method=CloudToDeviceMethod(
            method_name="lockDoor", payload={"lockTime": "10m"}, response_timeout_in_seconds=60
        ),
        query_condition=condition,
        start_time=datetime.datetime.now(datetime.timezone.utc),
        max_execution_time_in_seconds=3600,
    )
    created = call_with_timeout(jobs.create_scheduled_job, method_job_id, method_request, what="create method job")
    assert created.job_id == method_job_id
    assert created.type == "scheduleDeviceMethod"
    assert created.status in {"queued", "scheduled", "running", "completed"}
    print("job {} (scheduleDeviceMethod) created: {}".format(method_job_id, created.status))
    seen = {method_job_id: [created.status]}

    twin_request = JobRequest(
        job_id=twin_job_id,
        type="scheduleUpdateTwin",
        update_twin=Twin(etag="*", properties=TwinProperties(desired={"building": 43, "floor": 3})),
        query_condition=condition,
        start_time=datetime.datetime.now(datetime.timezone.utc),
        max_execution_time_in_seconds=3600,
    )
    created = call_with_timeout(jobs.create_scheduled_job, twin_job_id, twin_request, what="create twin job")
    assert created.job_id == twin_job_id
    assert created.type == "scheduleUpdateTwin"
    assert created.status in {"queued", "scheduled", "running", "completed"}
    print("job {} (scheduleUpdateTwin) created: {}".format(twin_job_id, created.status))
    seen[twin_job_id] = [created.status]

    # Poll both jobs until each is finished, printing every status seen (as the tutorial does).
    final = {}

    def both_finished():
        agent.assert_running()
        for job_id in (method_job_id, twin_job_id):
            if job_id in final:
                continue
            job = call_with_timeout(jobs.get_scheduled_job, job_id)
            if seen[job_id][-1] != job.status:
                seen[job_id].append(job.status)
                print("job {} ({}): {}".format(job_id, job.type, job.status))
            if job.status in TERMINAL_JOB_STATES:
                final[job_id] = job
        return len(final) == 2

    try:
        wait_for(both_finished, timeout=90, interval=0.5, what="both jobs to finish")
    except AssertionError as error:
        raise AssertionError("{}; statuses seen: {}\n{}".format(error, seen, agent.output())) from None
    print("statuses seen: {}".format(seen))

    for job_id, job in final.items():
        assert job.status == "completed", "job {} ended {} ({}); statuses seen {}".format(
            job_id, job.status, job.failure_reason, seen[job_id]
        )
        assert seen[job_id][0] in {"queued", "scheduled", "running", "completed"}
        stats = job.device_job_statistics
        assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (1, 1, 0), stats
        assert job.end_time is not None

    # The method job's per-device row: the device's status and payload.
    rows = query_rows(
        registry_manager, "SELECT * FROM devices.jobs WHERE jobId = '{}'".format(method_job_id)
    )
    assert rows.type == "DeviceJob"
    assert [(row.device_id, row.status) for row in rows.items] == [(device_id, "completed")]
    row = rows.items[0].additional_properties
    assert row.get("jobId") == method_job_id, row
    assert row["outcome"]["deviceMethodResponse"] == {
        "status": 200,
        "payload": {"Response": "lockDoor called successfully"},
    }, row

    # The twin job's row as well.
    rows = query_rows(registry_manager, "SELECT * FROM devices.jobs WHERE jobId = '{}'".format(twin_job_id))
    assert [(row.device_id, row.status) for row in rows.items] == [(device_id, "completed")]

    # The twin: the new desired properties, and the agent's acknowledgements and door state.
    def acknowledged(twin):
        desired = twin.properties.desired
        reported = twin.properties.reported
        if desired.get("building") != 43 or desired.get("floor") != 3:
            return False
        version = desired["$version"]
        for name in ("building", "floor"):
            ack = reported.get(name)
            if not isinstance(ack, dict) or ack.get("av") != version:
                return False
        door = reported.get("door")
        return isinstance(door, dict) and door.get("locked") is True

    twin = wait_reported(
        registry_manager, agent, acknowledged, "the agent's acknowledgements and door report", timeout=20
    )
    desired = twin.properties.desired
    reported = twin.properties.reported
    assert desired["building"] == 43 and desired["floor"] == 3
    for name, value in (("building", 43), ("floor", 3)):
        ack = reported[name]
        assert ack["ac"] == 200, ack
        assert ack["av"] == desired["$version"], (ack, desired["$version"])
        assert ack["value"] == value, ack
        assert isinstance(ack.get("ad"), str), ack
    door = reported["door"]
    assert door["locked"] is True
    # lockTime "10m": the door unlocks 600 s after it was locked.
    locked_at = datetime.datetime.fromisoformat(door["lockedAt"].replace("Z", "+00:00"))
    unlock_at = datetime.datetime.fromisoformat(door["unlockAt"].replace("Z", "+00:00"))
    assert (unlock_at - locked_at).total_seconds() == 600, door


# ---------------------------------------------------------------------------------------------
# telemetry


def test_agent_telemetry_reaches_the_hub(hub, make_device, run_agent):
    device_id, device, _ = make_device("telemetry")
    agent = run_agent(device_id, device_key(device))

    def enough():
        agent.assert_running()
        events = hub.recent_events(device_id)
        return events if len(events) >= 3 else None

    try:
        events = wait_for(enough, timeout=AGENT_CONNECT_TIMEOUT, interval=0.5, what="3 readings from the agent")
    except AssertionError as error:
        raise AssertionError("{}\n{}".format(error, agent.output())) from None

    bodies = [event["body"] for event in events]
    for event, body in zip(events, bodies):
        assert event["deviceId"] == device_id
        assert isinstance(body, dict), "the body must be JSON (got {!r})".format(body)
        for key in ("id", "timestamp", "temperature", "humidity", "uv", "seq"):
            assert key in body, "reading lacks {!r}: {!r}".format(key, body)
        assert body["id"] == device_id
        datetime.datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
        assert 70 <= body["temperature"] <= 100, body
        assert 70 <= body["humidity"] <= 100, body
        assert 0 <= body["uv"] <= 1, body
    seqs = [body["seq"] for body in bodies]
    assert seqs == list(range(1, len(seqs) + 1)), "seq must be 1..n contiguous, got {}".format(seqs)
    message_ids = [event["systemProperties"].get("message-id") for event in events]
    assert all(message_ids) and len(set(message_ids)) == len(message_ids), message_ids


# ---------------------------------------------------------------------------------------------
# a bad configuration


def _run_bad_config(hub, tmp_path, config_text, env_extra=None):
    config_path = tmp_path / "bad.toml"
    config_path.write_text(config_text)
    try:
        completed = subprocess.run(
            [str(_hub_binary()), "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=agent_env(env_extra),
            timeout=15,
        )
    except subprocess.TimeoutExpired as error:
        raise AssertionError("simdevice run with a bad configuration did not exit within 15 s") from error
    return completed, config_path


@pytest.mark.parametrize(
    "case",
    ["negative_interval", "unknown_key", "env_override", "toml_syntax_in_identity"],
)
def test_bad_configuration_exits_78_naming_the_key(hub, make_device, tmp_path, case):
    device_id, device, _ = make_device("badcfg")
    key = device_key(device)
    good = agent_config_text(hub, device_id, key)
    env_extra = None
    if case == "negative_interval":
        text = good.replace("interval_secs = 1\n", "interval_secs = -1\n")
        expected = ["telemetry.interval_secs"]
    elif case == "unknown_key":
        text = good + "intervall_secs = 5\n"
        expected = ["intervall_secs"]
    elif case == "env_override":
        text = good
        env_extra = {"SIMDEVICE__TELEMETRY__INTERVAL_SECS": "-1"}
        expected = ["telemetry.interval_secs", "SIMDEVICE__TELEMETRY__INTERVAL_SECS"]
    else:  # an unterminated string on the line that holds the key
        text = good.replace(key + ';GatewayHostName=localhost:{}"'.format(hub.mqtt_port), key, 1)
        assert text != good
        expected = ["line 2"]
    completed, config_path = _run_bad_config(hub, tmp_path, text, env_extra)
    stdout = completed.stdout.decode(errors="replace")
    stderr = completed.stderr.decode(errors="replace")
    shown = "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}".format(completed.returncode, stdout, stderr)

    assert completed.returncode == EX_CONFIG, shown
    for fragment in expected:
        assert fragment in stderr, "the error must name {!r}\n{}".format(fragment, shown)
    assert key not in stdout and key not in stderr, "the device key leaked\n" + shown
    assert "SharedAccessKey=" + key[:8] not in stdout + stderr, shown
