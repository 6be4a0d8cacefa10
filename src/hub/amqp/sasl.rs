//! The SASL exchange of one connection: ANONYMOUS or MSSBCBS (the client then puts a token on
//! `$cbs`, as azure-eventhub and uamqp do) or PLAIN with a policy name and one of its keys (its grant lasts as
//! long as the connection). A wrong PLAIN login fails the exchange (`auth`), as on Event Hubs.
//! IoT Hub's own login is PLAIN too: user `{policy}@sas.root.{hub}` and a SAS token as the
//! password (what the SDK samples send before following the redirect); its grant ends with
//! the token.

use std::sync::Arc;

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

use super::authz::{self, Grants};
use crate::hub::HubState;

const ANONYMOUS: &str = "ANONYMOUS";
const PLAIN: &str = "PLAIN";
/// Microsoft's mechanism for "a `$cbs` token follows", what uamqp (azure-iot-hub's
/// `send_c2d_message`) and the C and .NET SDKs offer: accepted as ANONYMOUS is.
const MSSBCBS: &str = "MSSBCBS";

#[derive(Clone)]
pub struct Sasl {
    pub state: Arc<HubState>,
    pub grants: Arc<Grants>,
}

impl std::fmt::Debug for Sasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sasl")
    }
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for Sasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from(PLAIN),
            Symbol::from(ANONYMOUS),
            Symbol::from(MSSBCBS),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            ANONYMOUS | MSSBCBS => outcome(SaslCode::Ok),
            PLAIN => {
                let response = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                // authzid NUL authcid NUL passwd
                let mut parts = response.split(|b| *b == 0);
                let (_authz, user, password) = (parts.next(), parts.next(), parts.next());
                let (Some(user), Some(password)) = (
                    user.and_then(|u| std::str::from_utf8(u).ok()),
                    password.and_then(|p| std::str::from_utf8(p).ok()),
                ) else {
                    tracing::info!("AMQP SASL PLAIN refused: malformed response");
                    return outcome(SaslCode::Auth);
                };
                let checked = match user.split_once("@sas.root.") {
                    Some((policy, _hub)) => {
                        let now = self.state.faults.now_unix();
                        authz::check_token(&self.state, password, now).and_then(|grant| {
                            if grant.policy == policy {
                                Ok(grant)
                            } else {
                                Err(crate::hub::auth::AuthFailure::UnknownPolicy(policy.into()))
                            }
                        })
                    }
                    None => authz::check_plain(&self.state, user, password),
                };
                match checked {
                    // A token's grant is kept as a token's, so that it ends when the token does.
                    Ok(grant) if grant.expires.is_some() => {
                        self.grants.put_token(format!("sasl:{user}"), grant);
                        outcome(SaslCode::Ok)
                    }
                    Ok(grant) => {
                        self.grants.set_sasl(grant);
                        outcome(SaslCode::Ok)
                    }
                    Err(failure) => {
                        tracing::info!(policy = user, reason = %failure, "AMQP SASL PLAIN refused");
                        outcome(SaslCode::Auth)
                    }
                }
            }
            other => {
                tracing::info!(mechanism = other, "AMQP SASL mechanism refused");
                outcome(SaslCode::Auth)
            }
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // Neither mechanism sends a challenge, so no response is expected.
        outcome(SaslCode::Sys)
    }
}
