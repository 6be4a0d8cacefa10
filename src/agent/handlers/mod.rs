//! The handler registry: how a direct method or a desired property reaches the code that
//! handles it.
//!
//! Handlers never see MQTT. A method handler gets the payload and returns a status and a
//! payload; a desired-property handler gets the value and returns an acknowledgement (the
//! Plug and Play `ac`/`ad`), and may report properties through [`HandlerContext`]. Names are
//! unique: registering one twice is an error at start-up. Built-in handlers are listed in one
//! place, [`builtin::register_all`]; methods that run a command come from the configuration
//! ([`command`]).

pub mod builtin;
pub mod command;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use super::context::HandlerContext;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A method's answer: the status and JSON payload handed to the caller as they are.
#[derive(Clone, Debug, PartialEq)]
pub struct MethodResponse {
    pub status: i32,
    pub payload: Value,
}

impl MethodResponse {
    pub fn ok(payload: Value) -> Self {
        MethodResponse {
            status: 200,
            payload,
        }
    }

    /// An error answer in the shape `{"error": message}`.
    pub fn error(status: i32, message: impl Into<String>) -> Self {
        MethodResponse {
            status,
            payload: serde_json::json!({ "error": message.into() }),
        }
    }
}

/// A desired property's outcome, reported back as `{"value","ac","av","ad"}`.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredAck {
    /// 200 accepted, 400 rejected, 500 failed (Plug and Play `ac`).
    pub status: u16,
    pub description: String,
}

impl DesiredAck {
    pub fn accepted(description: impl Into<String>) -> Self {
        DesiredAck {
            status: 200,
            description: description.into(),
        }
    }

    pub fn rejected(description: impl Into<String>) -> Self {
        DesiredAck {
            status: 400,
            description: description.into(),
        }
    }
}

pub trait MethodHandler: Send + Sync {
    fn call(&self, ctx: HandlerContext, payload: Value) -> BoxFuture<MethodResponse>;
}

pub trait DesiredHandler: Send + Sync {
    /// `name` is the property's name (the default handler serves many).
    fn apply(&self, ctx: HandlerContext, name: String, value: Value) -> BoxFuture<DesiredAck>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("a method handler named {0:?} is registered twice")]
    DuplicateMethod(String),
    #[error("a desired-property handler named {0:?} is registered twice")]
    DuplicateDesired(String),
}

/// Handlers by name. Built once at start-up (and again on SIGHUP), then shared read-only.
#[derive(Default)]
pub struct Registry {
    methods: HashMap<String, Arc<dyn MethodHandler>>,
    desired: HashMap<String, Arc<dyn DesiredHandler>>,
    default_desired: Option<Arc<dyn DesiredHandler>>,
}

impl Registry {
    pub fn add_method(
        &mut self,
        name: &str,
        handler: Arc<dyn MethodHandler>,
    ) -> Result<(), RegistryError> {
        if self.methods.contains_key(name) {
            return Err(RegistryError::DuplicateMethod(name.to_string()));
        }
        self.methods.insert(name.to_string(), handler);
        Ok(())
    }

    pub fn add_desired(
        &mut self,
        name: &str,
        handler: Arc<dyn DesiredHandler>,
    ) -> Result<(), RegistryError> {
        if self.desired.contains_key(name) {
            return Err(RegistryError::DuplicateDesired(name.to_string()));
        }
        self.desired.insert(name.to_string(), handler);
        Ok(())
    }

    /// The handler for desired properties no other handler claims.
    pub fn set_default_desired(&mut self, handler: Arc<dyn DesiredHandler>) {
        self.default_desired = Some(handler);
    }

    pub fn method(&self, name: &str) -> Option<Arc<dyn MethodHandler>> {
        self.methods.get(name).cloned()
    }

    pub fn desired(&self, name: &str) -> Option<Arc<dyn DesiredHandler>> {
        self.desired
            .get(name)
            .or(self.default_desired.as_ref())
            .cloned()
    }

    pub fn method_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.methods.keys().cloned().collect();
        names.sort();
        names
    }
}

/// Runs a method handler in its own task: a handler that panics gives a 500 answer and
/// nothing else; a slow one delays only its own call.
pub async fn call_method(
    registry: &Registry,
    ctx: HandlerContext,
    name: &str,
    payload: Value,
) -> MethodResponse {
    let Some(handler) = registry.method(name) else {
        return MethodResponse::error(
            404,
            format!("method '{name}' is not implemented by this device"),
        );
    };
    match tokio::spawn(handler.call(ctx, payload)).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(method = name, %error, "method handler failed");
            MethodResponse::error(500, format!("method '{name}' failed inside the device"))
        }
    }
}

/// Runs a desired-property handler in its own task, like [`call_method`].
pub async fn apply_desired(
    registry: &Registry,
    ctx: HandlerContext,
    name: &str,
    value: Value,
) -> Option<DesiredAck> {
    let handler = registry.desired(name)?;
    Some(
        match tokio::spawn(handler.apply(ctx, name.to_string(), value)).await {
            Ok(ack) => ack,
            Err(error) => {
                tracing::error!(property = name, %error, "desired-property handler failed");
                DesiredAck {
                    status: 500,
                    description: format!("handling '{name}' failed inside the device"),
                }
            }
        },
    )
}

/// A handler made from an async function, for the built-ins and for tests.
pub struct FnMethod<F>(pub F);

impl<F, Fut> MethodHandler for FnMethod<F>
where
    F: Fn(HandlerContext, Value) -> Fut + Send + Sync,
    Fut: Future<Output = MethodResponse> + Send + 'static,
{
    fn call(&self, ctx: HandlerContext, payload: Value) -> BoxFuture<MethodResponse> {
        Box::pin((self.0)(ctx, payload))
    }
}

pub struct FnDesired<F>(pub F);

impl<F, Fut> DesiredHandler for FnDesired<F>
where
    F: Fn(HandlerContext, String, Value) -> Fut + Send + Sync,
    Fut: Future<Output = DesiredAck> + Send + 'static,
{
    fn apply(&self, ctx: HandlerContext, name: String, value: Value) -> BoxFuture<DesiredAck> {
        Box::pin((self.0)(ctx, name, value))
    }
}
