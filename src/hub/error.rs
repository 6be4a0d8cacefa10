//! The hub's domain error: an IoT Hub error code and a message, as the real hub reports it.
//!
//! Registry, twin and method operations return this; the REST layer turns it into a status,
//! an `iothub-errorcode` header and the documented JSON body. Messages never carry secrets.
//!
//! [`LoadError`] is the other error here: state in the store that cannot be loaded at start
//! (the registry, the jobs), which stops the hub rather than answering a request.

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
    /// A 500 whose message carries the whole chain (the store's error and SQLite's reason).
    fn from(err: super::store::StoreError) -> Self {
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        IotHubError::internal(message)
    }
}

/// Stored state that cannot be loaded when the hub starts.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    /// A stored document (a device, a job, a job's device row) does not decode.
    #[error("stored {what} cannot be read")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A correction made while loading (a job interrupted by a stop) could not be saved.
    #[error("cannot save {what}")]
    Save {
        what: String,
        #[source]
        source: IotHubError,
    },
}
