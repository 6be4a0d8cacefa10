//! The `$cbs` put-token exchange as the service SDKs make it: a request link and a reply link
//! on the session, an IoT Hub style SAS token for a hub policy, the status code back.

use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use simdevice::protocol::sas;
use tokio::net::TcpStream;

use super::TestHub;

const DEADLINE: Duration = Duration::from_secs(10);

/// What azure-iot-hub does before its put-token: TLS to the hub's AMQP port, SASL ANONYMOUS,
/// and a session.
pub async fn anonymous_tls(hub: &TestHub) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let tcp = TcpStream::connect(hub.hub.amqp_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = hub.tls_connector().connect(name, tcp).await.unwrap();
    let mut connection = Connection::builder()
        .container_id("it-cbs")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Anonymous)
        .open_with_stream(tls)
        .await
        .expect("AMQP over TLS opens");
    let session = Session::begin(&mut connection).await.unwrap();
    (connection, session)
}

/// Links open on one session, for as many put-tokens as a test needs (a renewal).
pub struct Cbs {
    requests: Sender,
    responses: Receiver,
    sent: u32,
}

impl Cbs {
    pub async fn open(session: &mut SessionHandle<()>) -> Cbs {
        let requests = Sender::attach(session, "cbs-requests", "$cbs")
            .await
            .unwrap();
        let responses = reply_link(session).await;
        Cbs {
            requests,
            responses,
            sent: 0,
        }
    }

    /// Puts a token for `policy` signed with `key`, valid until `expiry` (Unix seconds).
    /// Returns the status code of the answer.
    pub async fn put_token(&mut self, policy: &str, key: &str, expiry: u64) -> i32 {
        self.sent += 1;
        let request = put_token_request(policy, key, expiry, self.sent);
        self.requests.send(request).await.unwrap();
        answer(&mut self.responses).await
    }
}

/// A put-token request (the `n`th on its link) for `policy`, answered on `cbs-reply`.
pub fn put_token_request(policy: &str, key: &str, expiry: u64, n: u32) -> Message<Body<Value>> {
    let token = sas::generate_token("localhost", key, Some(policy), expiry).unwrap();
    Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String(format!("put-{n}"))),
            reply_to: Some("cbs-reply".into()),
            ..Default::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("operation", "put-token")
                .insert("type", "servicebus.windows.net:sastoken")
                .insert("name", "https://localhost")
                .build(),
        )
        .body(Body::Value(AmqpValue(Value::String(token))))
        .build()
}

/// The reply link a put-token's answer comes back on.
pub async fn reply_link(session: &mut SessionHandle<()>) -> Receiver {
    Receiver::builder()
        .name("cbs-responses")
        .source("$cbs")
        .target("cbs-reply")
        .attach(session)
        .await
        .unwrap()
}

/// The status code of the next answer on `responses`, within the deadline.
pub async fn answer(responses: &mut Receiver) -> i32 {
    let response = tokio::time::timeout(DEADLINE, responses.recv::<Body<Value>>())
        .await
        .expect("a put-token answer")
        .unwrap();
    responses.accept(&response).await.unwrap();
    match response
        .message()
        .application_properties
        .as_ref()
        .and_then(|p| p.0.get("status-code"))
    {
        Some(SimpleValue::Int(code)) => *code,
        other => panic!("status-code {other:?}"),
    }
}
