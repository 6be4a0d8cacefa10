//! Method payloads as real services send them, through the hub's REST API and the device's
//! MQTT connection: the jobs tutorial's service sends `lockDoor`'s payload as a JSON string
//! holding the object, and the Python service SDK invoked without a payload sends `""`. The
//! built-in methods take the first as the object and the second as no payload.

use std::time::Duration;

use crate::common::agent::{agent_config, eventually, RunningAgent};
use crate::common::*;
use serde_json::{json, Value};

/// The hub's answer to a method call once the device is connected: `{"status", "payload"}`.
async fn invoke(service: &Service, method: &str, payload: Value) -> Value {
    eventually(Duration::from_secs(20), || async {
        let reply = service.invoke("door-01", method, payload.clone()).await;
        (reply.status == 200).then_some(reply.body)
    })
    .await
}

async fn door(service: &Service) -> Value {
    invoke(service, "getDeviceInfo", Value::Null).await["payload"]["door"].clone()
}

#[tokio::test]
async fn lock_door_takes_a_string_encoded_object_and_an_empty_string_as_no_payload() {
    let hub = TestHub::start().await;
    let key = hub.add_device("door-01");
    let service = hub.service();
    let agent = RunningAgent::start(agent_config(&hub, "door-01", &key, hub.hub.mqtt_addr()));

    // As the jobs tutorial's service sends it: the object, serialized into a JSON string.
    let answer = invoke(&service, "lockDoor", json!("{\"lockTime\":\"10m\"}")).await;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(
        answer["payload"]["Response"],
        "lockDoor called successfully"
    );
    let locked = door(&service).await;
    assert_eq!(locked["locked"], true, "{locked}");
    let locked_at = chrono::DateTime::parse_from_rfc3339(locked["lockedAt"].as_str().unwrap())
        .expect("lockedAt is a time");
    let unlock_at = chrono::DateTime::parse_from_rfc3339(locked["unlockAt"].as_str().unwrap())
        .expect("unlockAt is a time: the lockTime was read");
    assert_eq!((unlock_at - locked_at).num_seconds(), 600, "{locked}");
    let reported = eventually(Duration::from_secs(10), || async {
        let reported = service.reported("door-01").await;
        (reported["door"]["unlockAt"] == locked["unlockAt"]).then_some(reported)
    })
    .await;
    assert_eq!(reported["door"]["locked"], true);

    // As the Python service SDK sends "no payload": "" behaves as null.
    let unlocked = invoke(&service, "unlockDoor", json!("")).await;
    assert_eq!(unlocked["status"], 200, "{unlocked}");
    assert_eq!(door(&service).await["locked"], false);
    let with_empty = invoke(&service, "lockDoor", json!("")).await;
    let empty_door = door(&service).await;
    invoke(&service, "unlockDoor", Value::Null).await;
    let with_null = invoke(&service, "lockDoor", Value::Null).await;
    let null_door = door(&service).await;
    assert_eq!(with_empty, with_null, "the same answer as with no payload");
    assert_eq!(with_empty["status"], 200);
    assert_eq!(empty_door["locked"], true);
    assert_eq!(
        empty_door["unlockAt"],
        Value::Null,
        "locked until unlockDoor"
    );
    assert_eq!(null_door["unlockAt"], Value::Null);
    let info = invoke(&service, "getDeviceInfo", json!("")).await;
    assert_eq!(info["status"], 200);
    assert_eq!(info["payload"]["deviceId"], "door-01");

    // A string that holds no object is still refused, with the reason.
    let refused = invoke(&service, "lockDoor", json!("10m")).await;
    assert_eq!(refused["status"], 400, "{refused}");
    assert!(refused["payload"]["error"]
        .as_str()
        .unwrap()
        .contains("must be an object"));
    let refused = invoke(&service, "lockDoor", json!("{\"lockTime\":\"ten\"}")).await;
    assert_eq!(refused["status"], 400, "{refused}");
    assert!(refused["payload"]["error"]
        .as_str()
        .unwrap()
        .contains("\"ten\""));

    agent.stop().await;
    hub.stop().await;
}
