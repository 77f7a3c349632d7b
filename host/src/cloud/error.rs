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
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
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
