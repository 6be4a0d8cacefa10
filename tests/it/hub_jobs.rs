//! Scheduled jobs over real HTTPS and MQTT: method and twin jobs run on the devices their
//! condition matches, per-device rows in `devices.jobs`, scheduling, cancel, time limits,
//! request checks, and jobs across a restart.

use std::time::Duration;

use crate::common::*;
use reqwest::Method;
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use simdevice::hub::Hub;

/// A device that answers every method call with 200 and a fixed payload, until the hub closes.
async fn answering_device(hub: &TestHub, id: &str) -> tokio::task::JoinHandle<()> {
    let key = hub.add_device(id);
    let mut device = RawDevice::connect(hub, id, &key).await;
    device
        .subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    tokio::spawn(async move {
        loop {
            match device.recv_within(Duration::from_secs(60)).await {
                Ok(Some(Packet::Publish(call))) => {
                    device
                        .answer_method(
                            &rid_of(&call.topic),
                            200,
                            r#"{"Response":"lockDoor called successfully"}"#,
                        )
                        .await;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(()) => return,
            }
        }
    })
}

async fn create_job(service: &Service, id: &str, body: Value) -> Reply {
    service
        .call(Method::PUT, &format!("/jobs/v2/{id}"), Some(body), &[])
        .await
}

/// Polls the job until it reaches a final status; returns it.
async fn wait_until_done(service: &Service, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let reply = service.get(&format!("/jobs/v2/{id}")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let status = reply.body["status"].as_str().unwrap_or("").to_string();
        if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
            return reply.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} still {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn device_job_rows(service: &Service, job_id: &str) -> Reply {
    service
        .call(
            Method::POST,
            "/devices/query",
            Some(json!({
                "query": format!("SELECT * FROM devices.jobs WHERE jobId = '{job_id}'")
            })),
            &[],
        )
        .await
}

fn row<'a>(rows: &'a Value, device_id: &str) -> &'a Value {
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r["deviceId"] == device_id))
        .unwrap_or_else(|| panic!("no row for {device_id} in {rows}"))
}

fn method_job(id: &str, condition: &str) -> Value {
    json!({
        "jobId": id,
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {
            "methodName": "lockDoor",
            "payload": {"lockTime": "10m"},
            "responseTimeoutInSeconds": 10
        },
        "queryCondition": condition,
        "startTime": null
    })
}

#[tokio::test]
async fn method_job_calls_matching_devices_and_records_each_outcome() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let _a = answering_device(&hub, "door-a").await;
    let _b = answering_device(&hub, "door-b").await;
    hub.add_device("door-offline");
    let _unmatched = answering_device(&hub, "door-other").await;

    let reply = create_job(
        &service,
        "lock-1",
        method_job("lock-1", "deviceId IN ['door-a', 'door-b', 'door-offline']"),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["jobId"], "lock-1");
    assert_eq!(reply.body["type"], "scheduleDeviceMethod");
    assert_eq!(reply.body["maxExecutionTimeInSeconds"], 3600);
    assert!(
        ["queued", "running", "completed"].contains(&reply.body["status"].as_str().unwrap()),
        "{:?}",
        reply.body
    );

    let job = wait_until_done(&service, "lock-1").await;
    assert_eq!(
        job["status"], "completed",
        "failures are counted, not fatal"
    );
    assert_eq!(
        job["deviceJobStatistics"],
        json!({"deviceCount": 3, "failedCount": 1, "succeededCount": 2,
               "runningCount": 0, "pendingCount": 0})
    );
    assert!(job["endTime"].is_string(), "{job}");

    let reply = device_job_rows(&service, "lock-1").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.headers["x-ms-item-type"], "DeviceJob");
    assert_eq!(
        reply.body.as_array().map(Vec::len),
        Some(3),
        "{}",
        reply.body
    );
    for device in ["door-a", "door-b"] {
        let done = row(&reply.body, device);
        assert_eq!(done["status"], "completed");
        assert_eq!(done["jobType"], "scheduleDeviceMethod");
        assert_eq!(
            done["outcome"]["deviceMethodResponse"],
            json!({"status": 200, "payload": {"Response": "lockDoor called successfully"}})
        );
        assert!(done["startTimeUtc"].is_string() && done["endTimeUtc"].is_string());
    }
    let offline = row(&reply.body, "door-offline");
    assert_eq!(offline["status"], "failed");
    assert_eq!(offline["outcome"]["deviceMethodResponse"]["status"], 404103);
    assert_eq!(offline["error"]["code"], "DeviceNotOnline");

    let listed = service
        .get("/jobs/v2/query?jobType=scheduleDeviceMethod&jobStatus=completed")
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["type"], "jobResponse");
    assert_eq!(listed.body["continuationToken"], Value::Null);
    assert_eq!(listed.body["items"][0]["jobId"], "lock-1");
    let none = service
        .get("/jobs/v2/query?jobType=scheduleUpdateTwin")
        .await;
    assert_eq!(none.body["items"], json!([]));
    hub.stop().await;
}

#[tokio::test]
async fn twin_job_sets_desired_properties_on_the_matched_devices() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let key = hub.add_device("twin-1");
    hub.add_device("twin-2");
    hub.add_device("twin-3");
    let mut device = RawDevice::connect(&hub, "twin-1", &key).await;
    device
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await;

    // startTime and maxExecutionTimeInSeconds absent, as the Python SDK sends it.
    let reply = create_job(
        &service,
        "floor-3",
        json!({
            "jobId": "floor-3",
            "type": "scheduleUpdateTwin",
            "updateTwin": {"properties": {"desired": {"building": 43, "floor": 3}}, "etag": "*"},
            "queryCondition": "deviceId IN ['twin-1', 'twin-2']"
        }),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let job = wait_until_done(&service, "floor-3").await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["deviceJobStatistics"]["deviceCount"], 2);
    assert_eq!(job["deviceJobStatistics"]["succeededCount"], 2);
    for id in ["twin-1", "twin-2"] {
        let twin = service.get(&format!("/twins/{id}")).await.body;
        assert_eq!(twin["properties"]["desired"]["building"], 43, "{id}");
        assert_eq!(twin["properties"]["desired"]["floor"], 3, "{id}");
    }
    let untouched = service.get("/twins/twin-3").await.body;
    assert!(untouched["properties"]["desired"].get("building").is_none());
    // The connected device received the patch, as from a PATCH /twins call.
    let patch = device.next_publish().await;
    let body: Value = serde_json::from_slice(&patch.payload).unwrap();
    assert_eq!(body["building"], 43);

    // A stale etag fails that device's row (412001), and the job still completes.
    let reply = create_job(
        &service,
        "stale",
        json!({
            "type": "scheduleUpdateTwin",
            "updateTwin": {"tags": {"x": 1}, "etag": "not-the-etag"},
            "queryCondition": "deviceId = 'twin-3'"
        }),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let job = wait_until_done(&service, "stale").await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["deviceJobStatistics"]["failedCount"], 1);
    let rows = device_job_rows(&service, "stale").await.body;
    assert_eq!(row(&rows, "twin-3")["error"]["code"], "PreconditionFailed");
    hub.stop().await;
}

#[tokio::test]
async fn a_job_waits_for_its_start_time_and_can_be_cancelled() {
    let hub = TestHub::start().await;
    let service = hub.service();
    hub.add_device("later-1");
    let twin_job = |start: chrono::DateTime<chrono::Utc>| {
        json!({
            "type": "scheduleUpdateTwin",
            "updateTwin": {"properties": {"desired": {"at": "start"}}, "etag": "*"},
            "queryCondition": "deviceId = 'later-1'",
            "startTime": start.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "maxExecutionTimeInSeconds": 60
        })
    };

    let start = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let reply = create_job(&service, "soon", twin_job(start)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "scheduled");
    let now = service.get("/jobs/v2/soon").await.body;
    assert_eq!(now["status"], "scheduled");
    assert_eq!(now["deviceJobStatistics"]["deviceCount"], 0);
    let job = wait_until_done(&service, "soon").await;
    assert_eq!(job["status"], "completed");
    let rows = device_job_rows(&service, "soon").await.body;
    let ran_at: chrono::DateTime<chrono::Utc> = row(&rows, "later-1")["startTimeUtc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ran_at >= start, "ran at {ran_at}, before its start {start}");

    let far = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(
        create_job(&service, "never", twin_job(far)).await.status,
        200
    );
    let reply = service
        .call(Method::POST, "/jobs/v2/never/cancel", None, &[])
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "cancelled");
    assert!(reply.body["endTime"].is_string());
    assert_eq!(
        service.get("/jobs/v2/never").await.body["status"],
        "cancelled"
    );
    let listed = service.get("/jobs/v2/query?jobStatus=cancelled").await.body;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["items"][0]["jobId"], "never");
    // Cancelling an ended job changes nothing.
    let again = service
        .call(Method::POST, "/jobs/v2/soon/cancel", None, &[])
        .await;
    assert_eq!(again.body["status"], "completed");
    hub.stop().await;
}

#[tokio::test]
async fn a_job_past_its_max_execution_time_fails_its_unfinished_devices() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let key = hub.add_device("silent");
    let mut device = RawDevice::connect(&hub, "silent", &key).await;
    device
        .subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    let mut body = method_job("slow", "deviceId = 'silent'");
    body["maxExecutionTimeInSeconds"] = json!(1);
    assert_eq!(create_job(&service, "slow", body).await.status, 200);
    let call = device.next_publish().await;
    assert!(call.topic.starts_with("$iothub/methods/POST/lockDoor/"));
    let job = wait_until_done(&service, "slow").await;
    assert_eq!(job["status"], "failed");
    assert!(job["failureReason"]
        .as_str()
        .unwrap()
        .contains("maxExecutionTimeInSeconds"));
    assert_eq!(job["deviceJobStatistics"]["failedCount"], 1);
    let rows = device_job_rows(&service, "slow").await.body;
    assert_eq!(row(&rows, "silent")["error"]["code"], "JobTimedOut");
    hub.stop().await;
}

#[tokio::test]
async fn job_requests_are_checked() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let good = method_job("dup", "deviceId = 'x'");
    assert_eq!(create_job(&service, "dup", good.clone()).await.status, 200);
    let reply = create_job(&service, "dup", good.clone()).await;
    assert_eq!(reply.status, 409);
    assert_eq!(reply.error_code(), Some(409104));
    assert_eq!(reply.headers["iothub-errorcode"], "JobAlreadyExists");

    let reply = service.get("/jobs/v2/no-such-job").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error_code(), Some(404002));
    let reply = service
        .call(Method::POST, "/jobs/v2/no-such-job/cancel", None, &[])
        .await;
    assert_eq!(reply.error_code(), Some(404002));

    let mut bad_condition = good.clone();
    bad_condition["queryCondition"] = json!("deviceId IN [");
    let reply = create_job(&service, "bad-1", bad_condition).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error_code(), Some(400004));
    let mut bad_type = good.clone();
    bad_type["type"] = json!("export");
    assert_eq!(create_job(&service, "bad-2", bad_type).await.status, 400);
    let mut no_method = good.clone();
    no_method
        .as_object_mut()
        .unwrap()
        .remove("cloudToDeviceMethod");
    assert_eq!(create_job(&service, "bad-3", no_method).await.status, 400);
    let mut bad_method = good.clone();
    bad_method["cloudToDeviceMethod"]["responseTimeoutInSeconds"] = json!(1);
    assert_eq!(create_job(&service, "bad-4", bad_method).await.status, 400);
    assert_eq!(
        create_job(&service, "other-id", good.clone()).await.status,
        400
    );
    let mut bad_start = good.clone();
    bad_start["startTime"] = json!("tomorrow");
    assert_eq!(create_job(&service, "bad-5", bad_start).await.status, 400);
    for id in ["bad-1", "bad-2", "bad-3", "bad-4", "bad-5", "other-id"] {
        assert_eq!(service.get(&format!("/jobs/v2/{id}")).await.status, 404);
    }

    // Writes need RegistryWrite, reads RegistryRead.
    let reader = Service::new(&hub, "registryRead");
    assert_eq!(reader.get("/jobs/v2/dup").await.status, 200);
    assert_eq!(reader.get("/jobs/v2/query").await.status, 200);
    let mut other = good.clone();
    other["jobId"] = json!("by-reader");
    assert_eq!(
        create_job(&reader, "by-reader", other.clone()).await.status,
        401
    );
    other["jobId"] = json!("by-writer");
    let writer = Service::new(&hub, "registryReadWrite");
    assert_eq!(create_job(&writer, "by-writer", other).await.status, 200);
    assert_eq!(
        Service::new(&hub, "service")
            .get("/jobs/v2/dup")
            .await
            .status,
        401
    );

    // A path that is no operation: status and code agree.
    let reply = service.get("/nothing/here").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error_code(), Some(400004));
    hub.stop().await;
}

#[tokio::test]
async fn jobs_survive_a_restart_and_an_interrupted_job_is_failed() {
    let dir = tempfile::tempdir().unwrap();
    let config = simdevice::hub::HubConfig::ephemeral(dir.path());
    let first = TestHub {
        hub: Hub::start(config.clone()).await.unwrap(),
        dir,
    };
    let service = first.service();
    first.add_device("keep-1");
    let done = json!({
        "type": "scheduleUpdateTwin",
        "updateTwin": {"properties": {"desired": {"kept": true}}, "etag": "*"},
        "queryCondition": "deviceId = 'keep-1'"
    });
    assert_eq!(create_job(&service, "done", done).await.status, 200);
    assert_eq!(
        wait_until_done(&service, "done").await["status"],
        "completed"
    );
    let mut later = method_job("later", "deviceId = 'keep-1'");
    later["startTime"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    assert_eq!(create_job(&service, "later", later).await.status, 200);
    // A job in flight at shutdown: the device never answers.
    let key = first.add_device("mute");
    let mut mute = RawDevice::connect(&first, "mute", &key).await;
    mute.subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    let mut body = method_job("cut", "deviceId = 'mute'");
    body["cloudToDeviceMethod"]["responseTimeoutInSeconds"] = json!(300);
    assert_eq!(create_job(&service, "cut", body).await.status, 200);
    mute.next_publish().await;
    assert_eq!(service.get("/jobs/v2/cut").await.body["status"], "running");
    let TestHub { hub, dir } = first;
    hub.shutdown().await;

    let second = TestHub {
        hub: Hub::start(config).await.unwrap(),
        dir,
    };
    let service = second.service();
    let done = service.get("/jobs/v2/done").await.body;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["deviceJobStatistics"]["succeededCount"], 1);
    assert_eq!(
        service.get("/jobs/v2/later").await.body["status"],
        "scheduled"
    );
    let cut = service.get("/jobs/v2/cut").await.body;
    assert_eq!(cut["status"], "failed");
    assert!(cut["failureReason"]
        .as_str()
        .unwrap()
        .contains("hub stopped"));
    let rows = device_job_rows(&service, "cut").await.body;
    assert_eq!(row(&rows, "mute")["status"], "failed");
    assert_eq!(row(&rows, "mute")["error"]["code"], "JobInterrupted");
    let rows = device_job_rows(&service, "done").await.body;
    assert_eq!(row(&rows, "keep-1")["status"], "completed");
    let listed = service.get("/jobs/v2/query").await.body;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(3));
    second.stop().await;
}
