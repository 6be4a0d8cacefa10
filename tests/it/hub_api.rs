//! The hub's service REST API over real HTTPS: authorization, the registry, twins with etags,
//! queries with paging, statistics, errors in IoT Hub's shape, and state across a restart.

use crate::common::*;
use reqwest::Method;
use serde_json::json;
use simdevice::hub::Hub;
use simdevice::protocol::sas;

#[tokio::test]
async fn requests_need_a_valid_token_with_the_right_permission() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let owner_key = hub
        .hub
        .state()
        .policies
        .get("iothubowner")
        .unwrap()
        .primary_key
        .clone();

    let wrong = Service::with_key(&hub, "iothubowner", &sas::generate_key(), now() + 60);
    let reply = wrong.get("/devices/d1").await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.error_code(), Some(401002));
    assert_eq!(
        reply.headers["iothub-errorcode"],
        "IotHubUnauthorizedAccess"
    );

    let expired = Service::with_key(&hub, "iothubowner", &owner_key, now() - 1);
    assert_eq!(expired.get("/devices/d1").await.status, 401);
    let unknown = Service::with_key(&hub, "nosuchpolicy", &owner_key, now() + 60);
    assert_eq!(unknown.get("/devices/d1").await.status, 401);

    // registryRead reads the registry but cannot write it or touch twins.
    let reader = Service::new(&hub, "registryRead");
    assert_eq!(reader.get("/devices/d1").await.status, 200);
    assert_eq!(
        reader
            .call(Method::DELETE, "/devices/d1", None, &[])
            .await
            .status,
        401
    );
    assert_eq!(reader.get("/twins/d1").await.status, 401);
    // service reaches twins but not the registry.
    let service = Service::new(&hub, "service");
    assert_eq!(service.get("/twins/d1").await.status, 200);
    assert_eq!(service.get("/devices/d1").await.status, 401);
    // The device policy cannot use the service API at all.
    assert_eq!(
        Service::new(&hub, "device").get("/twins/d1").await.status,
        401
    );
    hub.stop().await;
}

#[tokio::test]
async fn device_registry_create_read_update_delete() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let create = json!({"deviceId": "door-01", "status": "enabled",
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}},
        "capabilities": {"iotEdge": false}});
    let reply = service
        .call(Method::PUT, "/devices/door-01", Some(create.clone()), &[])
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let device = reply.body;
    let primary = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    assert_eq!(primary.len(), 44, "a generated 32-byte key");
    assert_eq!(device["status"], "enabled");
    assert_eq!(device["connectionState"], "Disconnected");

    let again = service
        .call(Method::PUT, "/devices/door-01", Some(create), &[])
        .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code(), Some(409001));
    assert_eq!(again.headers["iothub-errorcode"], "DeviceAlreadyExists");
    assert!(again.body["Message"]
        .as_str()
        .unwrap()
        .starts_with("ErrorCode:DeviceAlreadyExists;"));

    let given = json!({"deviceId": "door-02", "authentication": {"type": "sas",
        "symmetricKey": {"primaryKey": sas::generate_key(), "secondaryKey": sas::generate_key()}}});
    assert_eq!(
        service
            .call(Method::PUT, "/devices/door-02", Some(given), &[])
            .await
            .status,
        200
    );
    let bad_id = service
        .call(
            Method::PUT,
            "/devices/bad%20id",
            Some(json!({"deviceId": "bad id"})),
            &[],
        )
        .await;
    assert_eq!(bad_id.status, 400);

    let listed = service.get("/devices?top=10").await.body;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["door-01", "door-02"]);

    // Update with a stale etag: 412; with the current one: 200.
    let mut update = device.clone();
    update["status"] = json!("disabled");
    let stale = service
        .call(
            Method::PUT,
            "/devices/door-01",
            Some(update.clone()),
            &[("If-Match", "\"stale\"")],
        )
        .await;
    assert_eq!(stale.status, 412);
    let etag = format!("\"{}\"", device["etag"].as_str().unwrap());
    let updated = service
        .call(
            Method::PUT,
            "/devices/door-01",
            Some(update),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(updated.status, 200);
    assert_eq!(updated.body["status"], "disabled");

    let stats = service.get("/statistics/devices").await.body;
    assert_eq!(
        stats,
        json!({"totalDeviceCount": 2, "enabledDeviceCount": 1, "disabledDeviceCount": 1})
    );
    assert_eq!(
        service.get("/statistics/service").await.body,
        json!({"connectedDeviceCount": 0})
    );

    let deleted = service
        .call(
            Method::DELETE,
            "/devices/door-01",
            None,
            &[("If-Match", "\"*\"")],
        )
        .await;
    assert_eq!(deleted.status, 204);
    let gone = service.get("/devices/door-01").await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.error_code(), Some(404001));
    hub.stop().await;
}

#[tokio::test]
async fn twins_update_with_etags_and_limits() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let service = hub.service();
    let twin = service.get("/twins/d1").await.body;
    assert_eq!(twin["properties"]["desired"]["$version"], 1);
    assert!(twin["properties"]["desired"]["$metadata"]["$lastUpdated"].is_string());
    let etag = format!("\"{}\"", twin["etag"].as_str().unwrap());

    let patch = json!({"tags": {"location": {"region": "US", "plant": "Redmond43"}},
        "properties": {"desired": {"building": 43, "floor": 3}}});
    let updated = service
        .call(
            Method::PATCH,
            "/twins/d1",
            Some(patch.clone()),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    assert_eq!(updated.body["tags"]["location"]["plant"], "Redmond43");
    assert_eq!(updated.body["properties"]["desired"]["floor"], 3);
    assert_eq!(updated.body["properties"]["desired"]["$version"], 2);
    assert_ne!(updated.body["etag"], twin["etag"]);

    // The old etag is stale now.
    let stale = service
        .call(
            Method::PATCH,
            "/twins/d1",
            Some(patch),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(stale.status, 412);
    assert_eq!(stale.error_code(), Some(412001));

    // null deletes; replace drops what it does not name.
    let removed = service
        .call(
            Method::PATCH,
            "/twins/d1",
            Some(json!({"properties": {"desired": {"floor": null}}})),
            &[],
        )
        .await;
    assert!(removed.body["properties"]["desired"].get("floor").is_none());
    let replaced = service
        .call(
            Method::PUT,
            "/twins/d1",
            Some(json!({"tags": {"a": 1}, "properties": {"desired": {"x": true}}})),
            &[],
        )
        .await;
    assert_eq!(replaced.status, 200);
    assert_eq!(replaced.body["tags"], json!({"a": 1}));
    assert!(replaced.body["properties"]["desired"]
        .get("building")
        .is_none());
    assert_eq!(replaced.body["properties"]["desired"]["x"], true);

    // Limits are errors that say what broke.
    for (body, needle) in [
        (
            json!({"properties": {"desired": {"bad key": 1}}}),
            "bad key",
        ),
        (json!({"tags": {"t": "x".repeat(9000)}}), "4"),
        (json!({"properties": {"reported": {"a": 1}}}), "reported"),
    ] {
        let reply = service
            .call(Method::PATCH, "/twins/d1", Some(body), &[])
            .await;
        assert_eq!(reply.status, 400);
        assert!(
            reply.body["Message"].as_str().unwrap().contains(needle),
            "{:?}",
            reply.body
        );
    }
    assert_eq!(
        service.get("/twins/nobody").await.error_code(),
        Some(404001)
    );
    hub.stop().await;
}

#[tokio::test]
async fn queries_filter_project_and_page() {
    let hub = TestHub::start().await;
    let service = hub.service();
    for i in 0..25 {
        let id = format!("dev-{i:02}");
        hub.add_device(&id);
        let plant = if i % 2 == 0 { "Redmond43" } else { "Other" };
        let patch = json!({"tags": {"location": {"plant": plant}, "n": i}});
        service
            .call(Method::PATCH, &format!("/twins/{id}"), Some(patch), &[])
            .await;
    }
    let query = |q: &str, headers: Vec<(&'static str, String)>| {
        let service = &service;
        let q = q.to_string();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            service
                .call(
                    Method::POST,
                    "/devices/query",
                    Some(json!({"query": q})),
                    &headers,
                )
                .await
        }
    };
    let reply = query(
        "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'",
        vec![],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-ms-item-type"], "Twin");
    assert!(
        reply.headers.get("x-ms-continuation").is_none(),
        "one page only"
    );
    assert_eq!(reply.body.as_array().unwrap().len(), 13);

    let reply = query(
        "SELECT * FROM devices WHERE tags.n >= 10 AND NOT (tags.n > 20) OR deviceId IN ['dev-00']",
        vec![],
    )
    .await;
    assert_eq!(reply.body.as_array().unwrap().len(), 12);

    // Paging: 25 twins, 10 a page.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..5 {
        let mut headers = vec![("x-ms-max-item-count", "10".to_string())];
        if let Some(t) = &token {
            headers.push(("x-ms-continuation", t.clone()));
        }
        let reply = query("SELECT * FROM devices", headers).await;
        seen.extend(
            reply
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["deviceId"].as_str().unwrap().to_string()),
        );
        token = reply
            .headers
            .get("x-ms-continuation")
            .map(|v| v.to_str().unwrap().to_string());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 25);
    seen.dedup();
    assert_eq!(seen.len(), 25);

    let reply = query(
        "SELECT COUNT() AS n FROM devices WHERE IS_DEFINED(tags.location)",
        vec![],
    )
    .await;
    assert_eq!(reply.headers["x-ms-item-type"], "Raw");
    assert_eq!(reply.body, json!([{"n": 25}]));

    let reply = query("SELECT * FROM devices WHERE", vec![]).await;
    assert_eq!(reply.status, 400);
    hub.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = simdevice::hub::HubConfig::ephemeral(dir.path());
    let first = TestHub {
        hub: Hub::start(config.clone()).await.unwrap(),
        dir,
    };
    first.add_device("d1");
    let key = first.device_key("d1");
    let service = first.service();
    service
        .call(
            Method::PATCH,
            "/twins/d1",
            Some(json!({"tags": {"k": "v"}, "properties": {"desired": {"x": 1}}})),
            &[],
        )
        .await;
    let mut device = RawDevice::connect(&first, "d1", &key).await;
    device
        .subscribe("$iothub/twin/res/#", rumqttc::QoS::AtMostOnce)
        .await;
    assert_eq!(device.twin_patch("1", r#"{"r":2}"#).await.0, 204);
    let info = first.hub.info().clone();
    let ca = first.ca_pem();
    let TestHub { hub, dir } = first;
    hub.shutdown().await;

    let second = TestHub {
        hub: Hub::start(config).await.unwrap(),
        dir,
    };
    assert_eq!(second.ca_pem(), ca, "the CA is kept");
    assert_eq!(
        second
            .hub
            .info()
            .service_connection_string
            .split(";SharedAccessKey=")
            .nth(1),
        info.service_connection_string
            .split(";SharedAccessKey=")
            .nth(1),
        "policy keys are kept"
    );
    let twin = second.service().get("/twins/d1").await.body;
    assert_eq!(twin["tags"]["k"], "v");
    assert_eq!(twin["properties"]["desired"]["x"], 1);
    assert_eq!(twin["properties"]["reported"]["r"], 2);
    // The device's key still works, through the new server certificate.
    RawDevice::connect(&second, "d1", &key).await;
    let written: simdevice::common::local_hub::HubInfo =
        simdevice::common::local_hub::HubInfo::read(second.dir.path()).unwrap();
    assert_eq!(&written, second.hub.info());
    second.stop().await;
}
