//! The edge API's errors: which ones are the caller's fault, and the one mapping of an error to
//! a response (a status and a JSON body, as the cloud's).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::protocol::ErrorBody;

/// An error the request caused (a missing input, a refused cut): the API answers 400. Plugins
/// refusing an input (`PluginError::Rejected`) and the cloud refusing one count as such too.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Whether `e` is the caller's fault (see [`BadRequest`]).
pub fn is_bad_request(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<BadRequest>()
            || matches!(
                c.downcast_ref::<crate::runtime::PluginError>(),
                Some(crate::runtime::PluginError::Rejected { .. })
            )
    })
}

/// A request body of a content type neither JSON nor safetensors, and no adapter to read it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnsupportedBody(pub String);

/// A service whose instances are all busy and whose queue is full: the API answers 503 with
/// Retry-After, at once.
#[derive(Debug, thiserror::Error)]
#[error("service `{service}` is busy: {queue} requests wait already (its `queue`); retry later")]
pub struct Overloaded {
    pub service: String,
    pub queue: usize,
}

/// An idempotency key sent again with another body: the API answers 422, as the IETF draft on
/// the `Idempotency-Key` header asks.
#[derive(Debug, thiserror::Error)]
#[error("Idempotency-Key `{0}` was used for another batch; a retry must send the same body")]
pub struct KeyReused(pub String);

/// An error as the API answers it.
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl std::fmt::Display) -> ApiError {
        ApiError(status, message.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    /// 503 for a busy service, 415 for a body nothing can read, 422 for an idempotency key
    /// reused for another body, 400 for what the caller got
    /// wrong, 507 when the state directory is full or read-only (nothing was kept), else 500.
    fn from(e: anyhow::Error) -> ApiError {
        let status = if e.chain().any(|c| c.is::<Overloaded>()) {
            StatusCode::SERVICE_UNAVAILABLE
        } else if e.chain().any(|c| c.is::<UnsupportedBody>()) {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else if e.chain().any(|c| c.is::<KeyReused>()) {
            StatusCode::UNPROCESSABLE_ENTITY
        } else if is_bad_request(&e) {
            StatusCode::BAD_REQUEST
        } else if crate::store::is_storage_error(&e) {
            return ApiError(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the edge's state directory is full or read-only, nothing was kept; send again later: {e:#}"),
            );
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError(status, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        // A busy service frees up within a request's time (a second is the header's unit); a
        // full disk takes an operator, so ask for a few seconds, as the cloud does.
        let retry_after = match self.0 {
            StatusCode::SERVICE_UNAVAILABLE => Some("1"),
            StatusCode::INSUFFICIENT_STORAGE => Some("5"),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(secs));
        }
        response
    }
}
