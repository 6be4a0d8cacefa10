//! Errors of the service API in IoT Hub's shape: the status of the error code, an
//! `iothub-errorcode` header with its name, and the body
//! `{"Message":"ErrorCode:{Name};{text}","ExceptionMessage":"...","errorCode":{number}}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::hub::error::IotHubError;
use crate::protocol::error_code::ErrorCode;

#[derive(Debug)]
pub struct ApiError {
    error: IotHubError,
    status: Option<StatusCode>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        IotHubError::argument(message).into()
    }

    pub fn unauthorized() -> Self {
        IotHubError::new(ErrorCode::IotHubUnauthorizedAccess, "Unauthorized").into()
    }

    /// Overrides the status the error code implies (for routes that do not exist).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }
}

impl From<IotHubError> for ApiError {
    fn from(error: IotHubError) -> Self {
        ApiError {
            error,
            status: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.error.code;
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        });
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let body = json!({
            "Message": format!("ErrorCode:{};{}", code.name(), self.error.message),
            "ExceptionMessage": format!("ErrorCode:{};Tracking ID:{}-TimeStamp:{now}", code.code(), uuid::Uuid::new_v4().simple()),
            "errorCode": code.code(),
        });
        let mut response = (status, Json(body)).into_response();
        if let Ok(name) = HeaderValue::from_str(code.name()) {
            response.headers_mut().insert("iothub-errorcode", name);
        }
        response
    }
}
