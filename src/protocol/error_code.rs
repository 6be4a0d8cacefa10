//! IoT Hub service error codes: the six-digit `iothub-errorcode` values, their Azure names (as in
//! `{"Message":"ErrorCode:DeviceNotFound;..."}`) and HTTP statuses. Names and numbers follow the
//! Azure .NET SDK's `ErrorCode` enum and the protocol doc; only the codes this project uses are here.

/// A service error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400001
    InvalidProtocolVersion,
    /// 400004
    ArgumentInvalid,
    /// 400005
    ArgumentNull,
    /// 400006
    IotHubFormatError,
    /// 401002: bad or expired token, unknown key.
    IotHubUnauthorizedAccess,
    /// 401003 (older spelling of an authorization failure).
    IotHubUnauthorized,
    /// 403002
    IotHubQuotaExceeded,
    /// 403004: too many pending cloud-to-device messages.
    DeviceMaximumQueueDepthExceeded,
    /// 404001
    DeviceNotFound,
    /// 404002
    JobNotFound,
    /// 404010
    ModuleNotFound,
    /// 404103: the device is not connected or not subscribed to methods.
    DeviceNotOnline,
    /// 409001
    DeviceAlreadyExists,
    /// 409104
    JobAlreadyExists,
    /// 412001: `If-Match` etag mismatch.
    PreconditionFailed,
    /// 413001 (HTTP 413 Request Entity Too Large).
    MessageTooLarge,
    /// 429001
    ThrottlingException,
    /// 500001
    ServerError,
    /// 503001
    ServiceUnavailable,
    /// 504101: the device did not answer a direct method in time.
    GatewayTimeout,
}

impl ErrorCode {
    /// Alias named after the HTTP status, for callers that think in statuses.
    #[allow(non_upper_case_globals)]
    pub const RequestEntityTooLarge: ErrorCode = ErrorCode::MessageTooLarge;

    /// Every code, for lookups and tests.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::InvalidProtocolVersion,
        ErrorCode::ArgumentInvalid,
        ErrorCode::ArgumentNull,
        ErrorCode::IotHubFormatError,
        ErrorCode::IotHubUnauthorizedAccess,
        ErrorCode::IotHubUnauthorized,
        ErrorCode::IotHubQuotaExceeded,
        ErrorCode::DeviceMaximumQueueDepthExceeded,
        ErrorCode::DeviceNotFound,
        ErrorCode::JobNotFound,
        ErrorCode::ModuleNotFound,
        ErrorCode::DeviceNotOnline,
        ErrorCode::DeviceAlreadyExists,
        ErrorCode::JobAlreadyExists,
        ErrorCode::PreconditionFailed,
        ErrorCode::MessageTooLarge,
        ErrorCode::ThrottlingException,
        ErrorCode::ServerError,
        ErrorCode::ServiceUnavailable,
        ErrorCode::GatewayTimeout,
    ];

    /// The six-digit code, e.g. 404001.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::InvalidProtocolVersion => 400001,
            ErrorCode::ArgumentInvalid => 400004,
            ErrorCode::ArgumentNull => 400005,
            ErrorCode::IotHubFormatError => 400006,
            ErrorCode::IotHubUnauthorizedAccess => 401002,
            ErrorCode::IotHubUnauthorized => 401003,
            ErrorCode::IotHubQuotaExceeded => 403002,
            ErrorCode::DeviceMaximumQueueDepthExceeded => 403004,
            ErrorCode::DeviceNotFound => 404001,
            ErrorCode::JobNotFound => 404002,
            ErrorCode::ModuleNotFound => 404010,
            ErrorCode::DeviceNotOnline => 404103,
            ErrorCode::DeviceAlreadyExists => 409001,
            ErrorCode::JobAlreadyExists => 409104,
            ErrorCode::PreconditionFailed => 412001,
            ErrorCode::MessageTooLarge => 413001,
            ErrorCode::ThrottlingException => 429001,
            ErrorCode::ServerError => 500001,
            ErrorCode::ServiceUnavailable => 503001,
            ErrorCode::GatewayTimeout => 504101,
        }
    }

    /// The Azure spelling, e.g. "DeviceNotFound".
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidProtocolVersion => "InvalidProtocolVersion",
            ErrorCode::ArgumentInvalid => "ArgumentInvalid",
            ErrorCode::ArgumentNull => "ArgumentNull",
            ErrorCode::IotHubFormatError => "IotHubFormatError",
            ErrorCode::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            ErrorCode::IotHubUnauthorized => "IotHubUnauthorized",
            ErrorCode::IotHubQuotaExceeded => "IotHubQuotaExceeded",
            ErrorCode::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            ErrorCode::DeviceNotFound => "DeviceNotFound",
            ErrorCode::JobNotFound => "JobNotFound",
            ErrorCode::ModuleNotFound => "ModuleNotFound",
            ErrorCode::DeviceNotOnline => "DeviceNotOnline",
            ErrorCode::DeviceAlreadyExists => "DeviceAlreadyExists",
            ErrorCode::JobAlreadyExists => "JobAlreadyExists",
            ErrorCode::PreconditionFailed => "PreconditionFailed",
            ErrorCode::MessageTooLarge => "MessageTooLarge",
            ErrorCode::ThrottlingException => "ThrottlingException",
            ErrorCode::ServerError => "ServerError",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
            ErrorCode::GatewayTimeout => "GatewayTimeout",
        }
    }

    /// The HTTP status: the first three digits of the code.
    pub fn http_status(self) -> u16 {
        // Every code is six digits, so this is 400..=599 and fits.
        (self.code() / 1000) as u16
    }

    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_codes() {
        let expected = [
            (ErrorCode::DeviceNotFound, 404001, 404),
            (ErrorCode::JobNotFound, 404002, 404),
            (ErrorCode::DeviceNotOnline, 404103, 404),
            (ErrorCode::DeviceAlreadyExists, 409001, 409),
            (ErrorCode::JobAlreadyExists, 409104, 409),
            (ErrorCode::PreconditionFailed, 412001, 412),
            (ErrorCode::ThrottlingException, 429001, 429),
            (ErrorCode::IotHubUnauthorized, 401003, 401),
            (ErrorCode::GatewayTimeout, 504101, 504),
            (ErrorCode::ArgumentInvalid, 400004, 400),
            (ErrorCode::ServerError, 500001, 500),
            (ErrorCode::RequestEntityTooLarge, 413001, 413),
        ];
        for (code, number, status) in expected {
            assert_eq!(code.code(), number);
            assert_eq!(code.http_status(), status);
            assert_eq!(ErrorCode::from_code(number), Some(code));
        }
        assert_eq!(ErrorCode::DeviceNotFound.name(), "DeviceNotFound");
        assert_eq!(ErrorCode::from_code(123), None);
    }

    #[test]
    fn codes_and_names_are_unique_and_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
            assert_eq!(ErrorCode::from_name(c.name()), Some(c));
            assert_eq!(c.to_string(), format!("{c:?}"));
            assert!((400..600).contains(&c.http_status()));
        }
    }
}
