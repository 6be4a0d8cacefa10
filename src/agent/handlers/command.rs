//! TEMPORARY stub until the command-method handler lands (being written now).
use serde_json::Value;

use super::{BoxFuture, MethodHandler, MethodResponse};
use crate::agent::context::HandlerContext;
use crate::config::CommandMethodConfig;

#[derive(Debug, thiserror::Error)]
#[error("command methods are not available yet")]
pub struct CommandMethodError;

pub struct CommandMethod;

impl CommandMethod {
    pub fn new(_config: &CommandMethodConfig) -> Result<Self, CommandMethodError> {
        Err(CommandMethodError)
    }
}

impl MethodHandler for CommandMethod {
    fn call(&self, _ctx: HandlerContext, _payload: Value) -> BoxFuture<MethodResponse> {
        Box::pin(async { MethodResponse::error(501, "not available") })
    }
}
