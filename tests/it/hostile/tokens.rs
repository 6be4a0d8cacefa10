//! Forged, expired and misdirected SAS tokens, for the service API and for devices.

use rumqttc::ConnectReturnCode;

use super::*;

#[tokio::test]
async fn forged_expired_and_misdirected_service_tokens_are_refused() {
    let hub = TestHub::start().await;
    let d1_key = hub.add_device("d1");
    let raw = RawService::new(&hub);
    let host = raw.host.clone();
    let owner_key = RawService::policy_key(&hub, "iothubowner");
    let reader_key = RawService::policy_key(&hub, "registryRead");
    let exp = now() + 3600;
    let sign = |sr: &str, key: &str, skn: Option<&str>, se: u64| {
        sas::generate_token(sr, key, skn, se).unwrap()
    };
    let good = sign(&host, &owner_key, Some("iothubowner"), exp);
    let call = |token: String| {
        let raw = &raw;
        async move { raw.call(Method::GET, "/twins/d1", &token, None, &[]).await }
    };

    // Accepted: the token as built, and (as IoT Hub, which sets no upper bound) far expiries.
    assert_eq!(call(good.clone()).await.0, 200);
    let century = now() + 100 * 365 * 24 * 3600;
    assert_eq!(
        call(sign(&host, &owner_key, Some("iothubowner"), century))
            .await
            .0,
        200
    );
    let secondary = hub
        .hub
        .state()
        .policies
        .get("iothubowner")
        .unwrap()
        .secondary_key
        .clone();
    assert_eq!(
        call(sign(&host, &secondary, Some("iothubowner"), exp))
            .await
            .0,
        200
    );

    let encoded_host = host.replace(':', "%3A");
    let cases: Vec<(&str, String)> = vec![
        (
            "expired 10 s ago",
            sign(&host, &owner_key, Some("iothubowner"), now() - 10),
        ),
        (
            "expired at 1",
            sign(&host, &owner_key, Some("iothubowner"), 1),
        ),
        ("expiry 0", sign(&host, &owner_key, Some("iothubowner"), 0)),
        (
            "another hub",
            sign(
                "other-hub.azure-devices.net",
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "another host on this port",
            sign(
                &host.replace("localhost", "example.com"),
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "another port",
            sign("localhost:1", &owner_key, Some("iothubowner"), exp),
        ),
        (
            "a device resource",
            sign(
                &format!("{host}/devices/d1"),
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "a trailing slash",
            sign(&format!("{host}/"), &owner_key, Some("iothubowner"), exp),
        ),
        (
            "a path",
            sign(
                &format!("{host}/twins"),
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "se moved later",
            good.replace(&format!("se={exp}"), &format!("se={}", exp + 3600)),
        ),
        (
            "se moved earlier",
            good.replace(&format!("se={exp}"), &format!("se={}", exp - 1)),
        ),
        (
            "se with a sign",
            good.replace(&format!("se={exp}"), &format!("se=+{exp}")),
        ),
        (
            "se too large for u64",
            good.replace(&format!("se={exp}"), "se=99999999999999999999999"),
        ),
        (
            "sr upper-cased",
            good.replace(
                &format!("sr={encoded_host}"),
                &format!("sr={}", encoded_host.to_uppercase()),
            ),
        ),
        (
            "sr re-encoded",
            good.replace(&format!("sr={encoded_host}"), &format!("sr={host}")),
        ),
        (
            "sr swapped for another hub",
            good.replace(
                &format!("sr={encoded_host}"),
                "sr=other-hub.azure-devices.net",
            ),
        ),
        ("se duplicated", format!("{good}&se={}", exp + 1)),
        (
            "sr duplicated",
            format!("{good}&sr=other-hub.azure-devices.net"),
        ),
        ("sig duplicated", format!("{good}&sig=AAAA")),
        ("skn duplicated", format!("{good}&skn=iothubowner")),
        (
            "skn unknown",
            sign(&host, &owner_key, Some("nosuchpolicy"), exp),
        ),
        (
            "skn in another case",
            sign(&host, &owner_key, Some("IotHubOwner"), exp),
        ),
        (
            "skn swapped to a stronger policy",
            sign(&host, &reader_key, Some("iothubowner"), exp),
        ),
        (
            "skn replaced after signing",
            sign(&host, &reader_key, Some("registryRead"), exp)
                .replace("skn=registryRead", "skn=iothubowner"),
        ),
        ("no skn", sign(&host, &owner_key, None, exp)),
        (
            "a device's own token",
            sign("localhost/devices/d1", &d1_key, None, exp),
        ),
        (
            "empty sig",
            good.split("&sig=").next().unwrap().to_string()
                + "&sig=&se="
                + &exp.to_string()
                + "&skn=iothubowner",
        ),
        ("sig not base64", good.replace("sig=", "sig=%%%")),
        (
            "sig from a random key",
            sign(&host, &sas::generate_key(), Some("iothubowner"), exp),
        ),
        (
            "no prefix",
            good.trim_start_matches("SharedAccessSignature ")
                .to_string(),
        ),
        (
            "lower-case prefix",
            good.replace("SharedAccessSignature", "sharedaccesssignature"),
        ),
        (
            "Bearer scheme",
            good.replace("SharedAccessSignature", "Bearer"),
        ),
        ("a field without '='", format!("{good}&junk")),
        ("empty header", String::new()),
    ];
    let mut tally = Tally::new("service-tokens", "401 Unauthorized");
    for (case, token) in cases {
        let (status, body) = call(token).await;
        tally.check(
            case,
            if status == 401 {
                Ok(())
            } else {
                Err(format!("answered {status} {body}"))
            },
        );
    }
    tally.finish();
    hub.stop().await;
}

#[tokio::test]
async fn forged_expired_and_misdirected_device_tokens_are_refused() {
    let hub = TestHub::start().await;
    let key1 = hub.add_device("d1");
    let key2 = hub.add_device("d2");
    let policy = |name: &str| RawService::policy_key(&hub, name);
    let exp = now() + 3600;
    let sign = |sr: &str, key: &str, skn: Option<&str>, se: u64| {
        sas::generate_token(sr, key, skn, se).unwrap()
    };
    let d1_sr = sas::device_resource("localhost", "d1", None);
    let good = sign(&d1_sr, &key1, None, exp);
    let connect = |client: &str, user: String, token: String| {
        let mut packet = connect_packet(client, &token, false, 60);
        packet.login = Some(rumqttc::Login::new(user, token));
        packet
    };
    let ack = |packet: rumqttc::Connect| {
        let hub = &hub;
        async move {
            let (mut device, ack) = RawDevice::connect_with(hub, packet).await;
            let closed = ack.code != ConnectReturnCode::Success
                && device.recv_within(Duration::from_secs(3)).await == Ok(None);
            (ack.code, closed)
        }
    };

    // Accepted: the token as built, and (as IoT Hub) any future expiry.
    let century = now() + 100 * 365 * 24 * 3600;
    for token in [good.clone(), sign(&d1_sr, &key1, None, century)] {
        assert_eq!(
            ack(connect("d1", user_name("d1"), token)).await.0,
            ConnectReturnCode::Success
        );
    }

    let encoded = |s: &str| s.replace('/', "%2F");
    let cases: Vec<(&str, rumqttc::Connect)> = vec![
        (
            "expired",
            connect("d1", user_name("d1"), sign(&d1_sr, &key1, None, now() - 10)),
        ),
        (
            "expiry 0",
            connect("d1", user_name("d1"), sign(&d1_sr, &key1, None, 0)),
        ),
        (
            "another hub",
            connect(
                "d1",
                user_name("d1"),
                sign("other.azure-devices.net/devices/d1", &key1, None, exp),
            ),
        ),
        (
            "another hub in token and user name",
            connect(
                "d1",
                user_name("d1").replace("localhost", "other.azure-devices.net"),
                sign("other.azure-devices.net/devices/d1", &key1, None, exp),
            ),
        ),
        (
            "another device's resource, own key",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d2", &key1, None, exp),
            ),
        ),
        (
            "another device's valid token",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d2", &key2, None, exp),
            ),
        ),
        (
            "resource in another case",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/D1", &key1, None, exp),
            ),
        ),
        (
            "module resource",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d1/modules/m", &key1, None, exp),
            ),
        ),
        (
            "resource with a trailing slash",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d1/", &key1, None, exp),
            ),
        ),
        (
            "resource with dot segments",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d2/../d1", &key1, None, exp),
            ),
        ),
        (
            "hub-wide resource",
            connect("d1", user_name("d1"), sign("localhost", &key1, None, exp)),
        ),
        (
            "se moved later",
            connect(
                "d1",
                user_name("d1"),
                good.replace(&format!("se={exp}"), &format!("se={}", exp + 3600)),
            ),
        ),
        (
            "sr swapped to d2, as d2",
            connect(
                "d2",
                user_name("d2"),
                good.replace(&encoded(&d1_sr), &encoded("localhost/devices/d2")),
            ),
        ),
        (
            "sr re-encoded",
            connect(
                "d1",
                user_name("d1"),
                good.replace(&encoded(&d1_sr), &d1_sr),
            ),
        ),
        (
            "sr duplicated",
            connect(
                "d1",
                user_name("d1"),
                format!("{good}&sr={}", encoded("localhost/devices/d2")),
            ),
        ),
        (
            "se duplicated",
            connect("d1", user_name("d1"), format!("{good}&se={}", exp + 1)),
        ),
        (
            "skn unknown",
            connect(
                "d1",
                user_name("d1"),
                sign(&d1_sr, &key1, Some("nosuchpolicy"), exp),
            ),
        ),
        (
            "skn iothubowner over a device key",
            connect(
                "d1",
                user_name("d1"),
                sign(&d1_sr, &key1, Some("iothubowner"), exp),
            ),
        ),
        (
            "skn device over a device key",
            connect(
                "d1",
                user_name("d1"),
                sign(&d1_sr, &key1, Some("device"), exp),
            ),
        ),
        (
            "policy without DeviceConnect",
            connect(
                "d1",
                user_name("d1"),
                sign(
                    &d1_sr,
                    &policy("registryReadWrite"),
                    Some("registryReadWrite"),
                    exp,
                ),
            ),
        ),
        (
            "empty sig",
            connect(
                "d1",
                user_name("d1"),
                good.split("&sig=").next().unwrap().to_string() + "&sig=&se=" + &exp.to_string(),
            ),
        ),
        (
            "user name for d2, token for d2",
            connect(
                "d1",
                user_name("d2"),
                sign("localhost/devices/d2", &key2, None, exp),
            ),
        ),
        (
            "client id d2, user name and token for d1",
            connect("d2", user_name("d1"), good.clone()),
        ),
        (
            "user name naming another hub",
            connect(
                "d1",
                user_name("d1").replace("localhost", "evil.example"),
                good.clone(),
            ),
        ),
        (
            "module client id",
            connect(
                "d1/m",
                "localhost/d1/m/?api-version=2021-04-12".into(),
                good.clone(),
            ),
        ),
        (
            "device id in another case",
            connect(
                "D1",
                user_name("D1"),
                sign("localhost/devices/D1", &key1, None, exp),
            ),
        ),
    ];
    let mut tally = Tally::new("device-tokens", "CONNACK 5, then closed");
    for (case, packet) in cases {
        let (code, closed) = ack(packet).await;
        tally.check(
            case,
            if code == ConnectReturnCode::NotAuthorized && closed {
                Ok(())
            } else {
                Err(format!("CONNACK {code:?}, closed {closed}"))
            },
        );
    }
    tally.finish();
    hub.stop().await;
}
