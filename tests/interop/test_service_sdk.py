"""azure-iot-hub 2.7.0 (service REST API) against simdevice hub."""

import base64
import datetime
import os

import pytest
from azure.iot.hub import IoTHubJobManager, IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, JobRequest, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from azure.iot.device import MethodResponse

from conftest import call_with_timeout, http_error_status, http_error_text, unique_id, wait_for


def expect_http_error(status, fn, *args, what=None):
    with pytest.raises(HttpOperationError) as caught:
        call_with_timeout(fn, *args, what=what)
    assert http_error_status(caught.value) == status, "expected HTTP {}, got {}: {}".format(
        status, http_error_status(caught.value), http_error_text(caught.value)[:500]
    )
    return caught.value


def test_create_device_generates_keys_and_get_device_returns_it(make_device, registry_manager):
    device_id, created, _ = make_device("create")

    assert created.device_id == device_id
    assert created.status == "enabled"
    assert created.etag
    assert created.authentication.type == "sas"
    primary = created.authentication.symmetric_key.primary_key
    secondary = created.authentication.symmetric_key.secondary_key
    assert primary and secondary and primary != secondary
    assert len(base64.b64decode(primary, validate=True)) >= 16
    assert len(base64.b64decode(secondary, validate=True)) >= 16

    fetched = call_with_timeout(registry_manager.get_device, device_id)
    assert fetched.device_id == device_id
    assert fetched.status == "enabled"
    assert fetched.connection_state == "Disconnected"
    assert fetched.authentication.symmetric_key.primary_key == primary
    assert fetched.authentication.symmetric_key.secondary_key == secondary

    # Creating the same id again is a conflict.
    error = expect_http_error(
        409, registry_manager.create_device_with_sas, device_id, "", "", "enabled", what="create twice"
    )
    assert "409001" in http_error_text(error) or "DeviceAlreadyExists" in http_error_text(error)


def test_update_device_with_etag(make_device, registry_manager):
    device_id, created, _ = make_device("update")
    keys = created.authentication.symmetric_key

    updated = call_with_timeout(
        registry_manager.update_device_with_sas,
        device_id,
        created.etag,
        keys.primary_key,
        keys.secondary_key,
        "disabled",
    )
    assert updated.status == "disabled"
    assert updated.authentication.symmetric_key.primary_key == keys.primary_key
    assert call_with_timeout(registry_manager.get_device, device_id).status == "disabled"


def test_twin_read_and_update_with_etag(make_device, registry_manager):
    device_id, _, _ = make_device("twin")

    twin = call_with_timeout(registry_manager.get_twin, device_id)
    assert twin.device_id == device_id
    assert twin.etag
    assert isinstance(twin.properties.desired["$version"], int)
    assert isinstance(twin.properties.reported["$version"], int)
    first_version = twin.properties.desired["$version"]

    updated = call_with_timeout(
        registry_manager.update_twin,
        device_id,
        Twin(properties=TwinProperties(desired={"interval": 30, "mode": "eco"})),
        twin.etag,
    )
    assert updated.properties.desired["interval"] == 30
    assert updated.properties.desired["mode"] == "eco"
    assert updated.properties.desired["$version"] > first_version
    assert updated.etag and updated.etag != twin.etag

    # The etag read before the update is stale now: 412, and nothing changes.
    error = expect_http_error(
        412,
        registry_manager.update_twin,
        device_id,
        Twin(properties=TwinProperties(desired={"interval": 99})),
        twin.etag,
        what="update_twin with a stale etag",
    )
    assert "412001" in http_error_text(error) or "PreconditionFailed" in http_error_text(error)
    current = call_with_timeout(registry_manager.get_twin, device_id)
    assert current.properties.desired["interval"] == 30

    # PATCH merges; null deletes.
    patched = call_with_timeout(
        registry_manager.update_twin,
        device_id,
        Twin(properties=TwinProperties(desired={"mode": None, "extra": {"a": 1}})),
        current.etag,
    )
    assert "mode" not in patched.properties.desired
    assert patched.properties.desired["interval"] == 30
    assert patched.properties.desired["extra"] == {"a": 1}

    # PUT replaces desired as a whole.
    replaced = call_with_timeout(
        registry_manager.replace_twin,
        device_id,
        Twin(properties=TwinProperties(desired={"only": True})),
        patched.etag,
    )
    assert replaced.properties.desired["only"] is True
    assert "interval" not in replaced.properties.desired
    assert replaced.properties.desired["$version"] > patched.properties.desired["$version"]


def test_query_by_tag_finds_exactly_the_tagged_device(make_device, registry_manager):
    tagged_id, _, _ = make_device("plant")
    other_id, _, _ = make_device("plant")
    make_device("plant")  # no tags at all

    call_with_timeout(
        registry_manager.update_twin,
        tagged_id,
        Twin(tags={"location": {"plant": "Redmond43", "region": "US"}}),
        "*",
    )
    call_with_timeout(
        registry_manager.update_twin, other_id, Twin(tags={"location": {"plant": "Lisbon7"}}), "*"
    )
    tags = call_with_timeout(registry_manager.get_twin, tagged_id).tags
    assert tags["location"] == {"plant": "Redmond43", "region": "US"}

    result = call_with_timeout(
        registry_manager.query_iot_hub,
        QuerySpecification(query="SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"),
    )
    found = [twin.device_id for twin in result.items]
    assert found == [tagged_id], "query returned {}".format(found)
    assert result.items[0].tags["location"]["plant"] == "Redmond43"
    assert (result.type or "").lower() == "twin"
    assert result.continuation_token is None


def test_query_pages_with_continuation_tokens(make_device, registry_manager):
    batch = unique_id("batch")
    ids = set()
    for _ in range(3):
        device_id, _, _ = make_device("page")
        call_with_timeout(registry_manager.update_twin, device_id, Twin(tags={"batch": batch}), "*")
        ids.add(device_id)

    query = QuerySpecification(query="SELECT * FROM devices WHERE tags.batch = '{}'".format(batch))
    seen, token, pages = [], None, 0
    while True:
        result = call_with_timeout(registry_manager.query_iot_hub, query, token, 1)
        pages += 1
        assert len(result.items) <= 1, "x-ms-max-item-count: 1 returned {} items".format(len(result.items))
        seen.extend(twin.device_id for twin in result.items)
        token = result.continuation_token
        if not token:
            break
        assert pages < 10, "continuation never ends"
    assert sorted(seen) == sorted(ids)
    assert pages >= 3


def test_statistics(make_device, registry_manager):
    before = call_with_timeout(registry_manager.get_device_registry_statistics)
    make_device("stats-on")
    make_device("stats-off", status="disabled")

    after = call_with_timeout(registry_manager.get_device_registry_statistics)
    assert after.total_device_count == before.total_device_count + 2
    assert after.enabled_device_count == before.enabled_device_count + 1
    assert after.disabled_device_count == before.disabled_device_count + 1
    assert after.total_device_count == after.enabled_device_count + after.disabled_device_count

    service = call_with_timeout(registry_manager.get_service_statistics)
    assert isinstance(service.connected_device_count, int)
    assert service.connected_device_count >= 0


def test_delete_device_then_get_is_404(make_device, registry_manager):
    device_id, _, _ = make_device("delete")

    call_with_timeout(registry_manager.delete_device, device_id)

    error = expect_http_error(404, registry_manager.get_device, device_id, what="get_device after delete")
    assert "404001" in http_error_text(error) or "DeviceNotFound" in http_error_text(error)
    expect_http_error(404, registry_manager.get_twin, device_id, what="get_twin after delete")


def test_wrong_policy_key_is_401(hub):
    wrong_key = base64.b64encode(os.urandom(32)).decode()
    manager = IoTHubRegistryManager.from_connection_string(hub.service_connection_string_with_key(wrong_key))

    expect_http_error(401, manager.get_device_registry_statistics, what="statistics with a wrong key")
    expect_http_error(401, manager.get_device, "anything", what="get_device with a wrong key")


def test_scheduled_twin_update_job(make_device, registry_manager, hub):
    device_id, _, _ = make_device("job")
    jobs = IoTHubJobManager.from_connection_string(hub.service_connection_string)
    job_id = unique_id("job")
    request = JobRequest(
        job_id=job_id,
        type="scheduleUpdateTwin",
        update_twin=Twin(etag="*", properties=TwinProperties(desired={"jobSet": 7})),
        query_condition="deviceId IN ['{}']".format(device_id),
        start_time=datetime.datetime.now(datetime.timezone.utc),
        max_execution_time_in_seconds=60,
    )

    created = call_with_timeout(jobs.create_scheduled_job, job_id, request)
    assert created.job_id == job_id
    assert created.type == "scheduleUpdateTwin"
    assert created.status in {"queued", "scheduled", "running", "completed"}

    def finished():
        job = call_with_timeout(jobs.get_scheduled_job, job_id)
        return job if job.status in {"completed", "failed", "cancelled"} else None

    job = wait_for(finished, timeout=30, interval=0.5, what="the job to finish")
    assert job.status == "completed", "job ended {} ({})".format(job.status, job.failure_reason)
    assert job.device_job_statistics.device_count == 1
    assert job.device_job_statistics.succeeded_count == 1
    assert call_with_timeout(registry_manager.get_twin, device_id).properties.desired["jobSet"] == 7

    expect_http_error(404, jobs.get_scheduled_job, unique_id("nojob"), what="get an unknown job")


def test_scheduled_device_method_job(make_device, device_client_factory, registry_manager, hub):
    """Scenario 3: a job calls lockDoor on the devices its condition matches."""
    device_id, _, connection_string = make_device("jobdoor")
    client = device_client_factory(connection_string)
    call_with_timeout(client.connect, what="IoTHubDeviceClient.connect")
    seen = []

    def on_method(request):
        seen.append((request.name, request.payload))
        client.send_method_response(
            MethodResponse.create_from_method_request(
                request, 200, {"Response": "lockDoor called successfully"}
            )
        )

    call_with_timeout(setattr, client, "on_method_request_received", on_method, what="subscribe to methods")

    jobs = IoTHubJobManager.from_connection_string(hub.service_connection_string)
    job_id = unique_id("jobm")
    request = JobRequest(
        job_id=job_id,
        type="scheduleDeviceMethod",
        cloud_to_device_method=CloudToDeviceMethod(
            method_name="lockDoor", payload={"lockTime": "10m"}, response_timeout_in_seconds=60
        ),
        query_condition="deviceId IN ['{}']".format(device_id),
        start_time=datetime.datetime.now(datetime.timezone.utc),
        max_execution_time_in_seconds=60,
    )

    created = call_with_timeout(jobs.create_scheduled_job, job_id, request)
    assert created.job_id == job_id
    assert created.type == "scheduleDeviceMethod"
    assert created.status in {"queued", "scheduled", "running", "completed"}

    def finished():
        job = call_with_timeout(jobs.get_scheduled_job, job_id)
        return job if job.status in {"completed", "failed", "cancelled"} else None

    job = wait_for(finished, timeout=30, interval=0.5, what="the job to finish")
    assert job.status == "completed", "job ended {} ({})".format(job.status, job.failure_reason)
    assert job.device_job_statistics.device_count == 1
    assert job.device_job_statistics.succeeded_count == 1
    assert job.device_job_statistics.failed_count == 0
    assert job.end_time is not None
    assert seen == [("lockDoor", {"lockTime": "10m"})]

    listed = call_with_timeout(jobs.query_scheduled_jobs, "scheduleDeviceMethod", "completed")
    assert job_id in [item["jobId"] for item in listed.items]

    rows = call_with_timeout(
        registry_manager.query_iot_hub,
        QuerySpecification(query="SELECT * FROM devices.jobs WHERE jobId = '{}'".format(job_id)),
    )
    assert rows.type == "DeviceJob"
    assert [(row.device_id, row.status) for row in rows.items] == [(device_id, "completed")]
    assert rows.items[0].additional_properties["outcome"]["deviceMethodResponse"] == {
        "status": 200,
        "payload": {"Response": "lockDoor called successfully"},
    }
