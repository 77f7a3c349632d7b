//! The API's errors: a status and a JSON body (`{"error": "..."}`).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::protocol::ErrorBody;
use crate::store::StoreError;

/// An HTTP error with a JSON body.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.0 == StatusCode::INSUFFICIENT_STORAGE;
        let mut resp = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        if retry {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_storage() {
            return full(&e);
        }
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// 507 with `Retry-After`: the state directory is full or read-only; nothing was written, and
/// the same request succeeds once space returns.
fn full(e: &dyn std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::INSUFFICIENT_STORAGE,
        format!("the cloud's state directory is full or read-only, nothing was written; send again later: {e}"),
    )
}

/// An I/O error of the cloud's own files: 507 when the state directory is full or read-only,
/// else 500.
pub fn io_error(e: std::io::Error) -> ApiError {
    if crate::store::io_is_storage(&e) {
        return full(&e);
    }
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn err(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}
/// A 503 with `Retry-After: 1`.
pub fn retry_later(message: String) -> Response {
    let mut resp = err(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
    resp
}
