//! The handlers every simdevice has, listed in one place ([`register_all`]): the methods
//! `lockDoor`, `unlockDoor` and `getDeviceInfo`, the desired property `telemetryInterval`, the
//! default desired-property handler, and the cloud-to-device message handler.
//!
//! Payloads of the built-in methods are taken as real services send them ([`builtin_payload`]):
//! a JSON string whose content is a JSON object stands for that object (the jobs tutorial's
//! service sends `"{\"lockTime\":\"10m\"}"`), and an empty string (what the Python service SDK
//! sends when invoked with no payload) is no payload, like `null` or nothing at all.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::command::CommandMethod;
use super::{
    DesiredAck, FnDesired, FnMethod, MethodHandler, MethodResponse, Registry, RegistryError,
};
use crate::agent::context::HandlerContext;
use crate::agent::door::parse_lock_time;
use crate::config::CommandMethodConfig;
use crate::protocol::property_bag::PropertyBag;

/// Bounds of `telemetryInterval`, in seconds (the same as the configuration's).
const INTERVAL_RANGE: (f64, f64) = (0.05, 86_400.0);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Duplicate(#[from] RegistryError),
    #[error(transparent)]
    Command(#[from] super::command::CommandMethodError),
}

/// The registry of a device: the built-ins, then the command methods of the configuration.
pub fn register_all(commands: &[CommandMethodConfig]) -> Result<Registry, BuildError> {
    let mut registry = Registry::default();
    registry.add_method("lockDoor", builtin(lock_door))?;
    registry.add_method("unlockDoor", builtin(unlock_door))?;
    registry.add_method("getDeviceInfo", builtin(device_info))?;
    registry.add_desired("telemetryInterval", Arc::new(FnDesired(telemetry_interval)))?;
    registry.set_default_desired(Arc::new(FnDesired(store_desired)));
    for config in commands {
        let method = CommandMethod::new(config)?;
        registry.add_method(&config.name, Arc::new(method))?;
    }
    Ok(registry)
}

/// A built-in method: its payload goes through [`builtin_payload`] first.
fn builtin<F, Fut>(handler: F) -> Arc<dyn MethodHandler>
where
    F: Fn(HandlerContext, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = MethodResponse> + Send + 'static,
{
    Arc::new(FnMethod(move |ctx, payload| {
        handler(ctx, builtin_payload(payload))
    }))
}

/// The payload a built-in method sees: a JSON string whose content (around whitespace) parses
/// as a JSON object is that object; an empty or all-blank string is no payload (`null`);
/// anything else is left as it is (and refused by the method if it expects an object).
pub fn builtin_payload(payload: Value) -> Value {
    let Value::String(text) = &payload else {
        return payload;
    };
    if text.trim().is_empty() {
        return Value::Null;
    }
    match serde_json::from_str::<Value>(text) {
        Ok(object @ Value::Object(_)) => object,
        _ => payload,
    }
}

async fn lock_door(ctx: HandlerContext, payload: Value) -> MethodResponse {
    let lock_time = match &payload {
        Value::Null => None,
        Value::Object(fields) => match fields.get("lockTime") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => match parse_lock_time(text) {
                Ok(duration) => Some(duration),
                Err(error) => return MethodResponse::error(400, error.to_string()),
            },
            Some(other) => {
                return MethodResponse::error(
                    400,
                    format!("lockTime must be a string such as \"10m\", not {other}"),
                )
            }
        },
        other => {
            return MethodResponse::error(
                400,
                format!(
                    "the payload must be an object such as {{\"lockTime\":\"10m\"}}, not {other}"
                ),
            )
        }
    };
    let report = ctx.lock_door(lock_time).reported();
    tracing::info!(
        device = ctx.device_id(),
        lock_time_s = lock_time.map(|d| d.as_secs()),
        "door locked"
    );
    if let Err(error) = ctx.report(report) {
        tracing::warn!(%error, "door state not reported");
    }
    MethodResponse::ok(json!({"Response": "lockDoor called successfully"}))
}

async fn unlock_door(ctx: HandlerContext, _payload: Value) -> MethodResponse {
    let report = ctx.unlock_door().reported();
    tracing::info!(device = ctx.device_id(), "door unlocked");
    if let Err(error) = ctx.report(report) {
        tracing::warn!(%error, "door state not reported");
    }
    MethodResponse::ok(json!({"Response": "unlockDoor called successfully"}))
}

async fn device_info(ctx: HandlerContext, _payload: Value) -> MethodResponse {
    let door = ctx.door().reported();
    MethodResponse::ok(json!({
        "deviceId": ctx.device_id(),
        "software": "simdevice",
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": ctx.uptime().as_secs(),
        "telemetryIntervalSeconds": ctx.telemetry_interval().as_secs_f64(),
        "door": door["door"],
        "settings": Value::Object(ctx.settings().clone()),
        "counters": ctx.counters().to_json(),
        "durable": ctx.is_durable(),
    }))
}

async fn telemetry_interval(ctx: HandlerContext, _name: String, value: Value) -> DesiredAck {
    let Some(seconds) = value.as_f64() else {
        return DesiredAck::rejected(format!(
            "telemetryInterval must be a number of seconds, not {value}"
        ));
    };
    if !(INTERVAL_RANGE.0..=INTERVAL_RANGE.1).contains(&seconds) {
        return DesiredAck::rejected(format!(
            "telemetryInterval {seconds} is outside {}..={} seconds",
            INTERVAL_RANGE.0, INTERVAL_RANGE.1
        ));
    }
    ctx.set_telemetry_interval(Duration::from_secs_f64(seconds));
    DesiredAck::accepted(format!("telemetry every {seconds} s"))
}

/// Any other desired property: kept (a null removes it) and acknowledged. The stored values
/// are shown by `getDeviceInfo`.
async fn store_desired(ctx: HandlerContext, name: String, value: Value) -> DesiredAck {
    let mut settings = ctx.settings();
    if value.is_null() {
        settings.remove(&name);
        DesiredAck::accepted("removed")
    } else {
        settings.insert(name, value);
        DesiredAck::accepted("stored")
    }
}

/// A cloud-to-device message: logged and counted (the hub completed it with our PUBACK).
pub fn on_cloud_to_device(ctx: &HandlerContext, properties: &PropertyBag, body: &[u8]) {
    crate::agent::context::Counters::bump(&ctx.counters().cloud_to_device);
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    tracing::info!(device = ctx.device_id(), message_id = properties.get("$.mid"), bytes = body.len(),
        body = %text, "cloud-to-device message received");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::handlers::{apply_desired, call_method};

    #[tokio::test]
    async fn lock_door_with_and_without_payload_and_with_a_bad_one() {
        let registry = register_all(&[]).unwrap();
        let (ctx, mut reports) = HandlerContext::for_tests();
        let answer = call_method(&registry, ctx.clone(), "lockDoor", Value::Null).await;
        assert_eq!(
            answer,
            MethodResponse::ok(json!({"Response": "lockDoor called successfully"}))
        );
        let report = reports.recv().await.unwrap();
        assert_eq!(report["door"]["locked"], true);
        assert_eq!(report["door"]["unlockAt"], Value::Null);

        let answer = call_method(
            &registry,
            ctx.clone(),
            "lockDoor",
            json!({"lockTime": "10m"}),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert!(reports.recv().await.unwrap()["door"]["unlockAt"].is_string());

        for bad in [
            json!({"lockTime": "ten"}),
            json!({"lockTime": 10}),
            json!("10m"),
            json!([1]),
        ] {
            let answer = call_method(&registry, ctx.clone(), "lockDoor", bad.clone()).await;
            assert_eq!(answer.status, 400, "{bad}");
            assert!(answer.payload["error"].is_string());
        }
        let answer = call_method(&registry, ctx.clone(), "openPodBayDoors", Value::Null).await;
        assert_eq!(answer.status, 404);
        assert!(answer.payload["error"]
            .as_str()
            .unwrap()
            .contains("openPodBayDoors"));
    }

    #[tokio::test]
    async fn telemetry_interval_is_range_checked_and_takes_effect() {
        let registry = register_all(&[]).unwrap();
        let (ctx, _reports) = HandlerContext::for_tests();
        let ack = apply_desired(&registry, ctx.clone(), "telemetryInterval", json!(5))
            .await
            .unwrap();
        assert_eq!(ack.status, 200);
        assert_eq!(ctx.telemetry_interval(), Duration::from_secs(5));
        for bad in [json!(0), json!(-1), json!(100000), json!("5")] {
            let ack = apply_desired(&registry, ctx.clone(), "telemetryInterval", bad.clone())
                .await
                .unwrap();
            assert_eq!(ack.status, 400, "{bad}");
        }
        assert_eq!(ctx.telemetry_interval(), Duration::from_secs(5));
        let ack = apply_desired(&registry, ctx.clone(), "building", json!(43))
            .await
            .unwrap();
        assert_eq!(ack, DesiredAck::accepted("stored"));
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_duplicates_are_refused() {
        let mut registry = register_all(&[]).unwrap();
        registry
            .add_method(
                "explode",
                Arc::new(FnMethod(|_ctx, _payload| async { panic!("boom") })),
            )
            .unwrap();
        let (ctx, _reports) = HandlerContext::for_tests();
        let answer = call_method(&registry, ctx.clone(), "explode", Value::Null).await;
        assert_eq!(answer.status, 500);
        let again = call_method(&registry, ctx, "getDeviceInfo", Value::Null).await;
        assert_eq!(again.status, 200, "the registry still works");
        let duplicate = registry.add_method("lockDoor", Arc::new(FnMethod(unlock_door)));
        assert_eq!(
            duplicate,
            Err(RegistryError::DuplicateMethod("lockDoor".into()))
        );
    }

    #[test]
    fn a_string_holding_an_object_is_that_object_and_an_empty_string_is_no_payload() {
        let object = json!({"lockTime": "10m"});
        assert_eq!(builtin_payload(json!("{\"lockTime\":\"10m\"}")), object);
        assert_eq!(builtin_payload(json!(" {\"lockTime\":\"10m\"} \n")), object);
        assert_eq!(builtin_payload(object.clone()), object);
        assert_eq!(builtin_payload(json!("")), Value::Null);
        assert_eq!(builtin_payload(json!("  ")), Value::Null);
        assert_eq!(builtin_payload(Value::Null), Value::Null);
        // Strings that hold no object stay strings (and lockDoor refuses them).
        for other in ["10m", "[1]", "\"{}\"", "{not json", "42", "null"] {
            assert_eq!(builtin_payload(json!(other)), json!(other), "{other}");
        }
        assert_eq!(builtin_payload(json!([1])), json!([1]));
    }

    #[tokio::test]
    async fn lock_door_takes_a_string_encoded_object_and_an_empty_string() {
        let registry = register_all(&[]).unwrap();
        let (ctx, mut reports) = HandlerContext::for_tests();
        let answer = call_method(
            &registry,
            ctx.clone(),
            "lockDoor",
            json!("{\"lockTime\":\"10m\"}"),
        )
        .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let report = reports.recv().await.unwrap();
        assert!(
            report["door"]["unlockAt"].is_string(),
            "locked for 10 minutes"
        );
        assert!(ctx.door().unlock_at.is_some());

        let answer = call_method(&registry, ctx.clone(), "lockDoor", json!("")).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(
            reports.recv().await.unwrap()["door"]["unlockAt"],
            Value::Null,
            "as with no payload: until unlockDoor"
        );
        let answer = call_method(&registry, ctx.clone(), "unlockDoor", json!("")).await;
        assert_eq!(answer.status, 200);
        let answer = call_method(&registry, ctx.clone(), "getDeviceInfo", json!("")).await;
        assert_eq!(answer.status, 200);

        let answer = call_method(&registry, ctx, "lockDoor", json!("{\"lockTime\":\"ten\"}")).await;
        assert_eq!(answer.status, 400, "the object's content is still checked");
    }
}
