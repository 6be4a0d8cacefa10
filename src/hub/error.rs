//! The hub's domain error: an IoT Hub error code and a message, as the real hub reports it.
//!
//! Registry, twin and method operations return this; the REST layer turns it into a status,
//! an `iothub-errorcode` header and the documented JSON body. Messages never carry secrets.

use crate::protocol::error_code::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct IotHubError {
    pub code: ErrorCode,
    pub message: String,
}

impl IotHubError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        IotHubError {
            code,
            message: message.into(),
        }
    }

    pub fn device_not_found(device_id: &str) -> Self {
        Self::new(
            ErrorCode::DeviceNotFound,
            format!("Device {device_id} could not be found."),
        )
    }

    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ServerError, message)
    }
}

impl From<super::store::StoreError> for IotHubError {
    fn from(err: super::store::StoreError) -> Self {
        IotHubError::internal(err.to_string())
    }
}
