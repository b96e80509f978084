//! Errors as OpenAI shapes them: an HTTP status and
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dsv3_runtime::engine::SubmitError;

/// One error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `overloaded_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400: the request is malformed or asks for something out of range.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError { param: param.map(str::to_string), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    /// 400 for a field of the wrong JSON type.
    pub fn wrong_type(param: &str, expected: &str) -> Self {
        Self::invalid(Some(param), format!("`{param}` must be {expected}"))
    }

    /// 400 for a field this server does not implement (with a value that would matter).
    pub fn unsupported(param: &str, detail: &str) -> Self {
        ApiError { code: Some("unsupported_parameter"), ..Self::invalid(Some(param), format!("`{param}` is not supported: {detail}")) }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("the model `{model}` does not exist; this server serves `{served}`"),
            )
        }
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError {
            code: Some("request_too_large"),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body exceeds {limit} bytes"))
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", format!("no route {path}"))
    }

    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed")
    }

    pub fn timeout() -> Self {
        ApiError { code: Some("timeout"), ..Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", "the request did not finish in time") }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The error's JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => ApiError {
                code: Some("queue_full"),
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", e.to_string())
            },
            SubmitError::ShuttingDown => ApiError {
                code: Some("shutting_down"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", e.to_string())
            },
            SubmitError::PromptTooLong { .. } | SubmitError::ContextExceeded { .. } => {
                ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid(e.param(), e.to_string()) }
            }
            _ => ApiError::invalid(e.param(), e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
            r.headers_mut().insert(header::RETRY_AFTER, s);
        }
        r
    }
}
