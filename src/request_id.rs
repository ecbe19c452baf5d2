//! The request id of every call: the client's `x-request-id` header when it is usable,
//! else one generated here. [`RequestIdLayer`] puts it into the request's headers (so the
//! handlers and the audit trail see the same id as the logs) and onto the call's span.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The header carrying the request id.
pub const HEADER: &str = "x-request-id";

/// A client's request id, if usable: 1 to 128 visible ASCII characters.
pub fn usable(value: Option<&http::HeaderValue>) -> Option<&str> {
    value
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// The request id of a call that passed [`RequestIdLayer`].
pub fn of<T>(request: &tonic::Request<T>) -> Option<String> {
    request
        .metadata()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Gives every request a usable `x-request-id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = WithRequestId<S>;
    fn layer(&self, inner: S) -> WithRequestId<S> {
        WithRequestId { inner }
    }
}

#[derive(Debug, Clone)]
pub struct WithRequestId<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for WithRequestId<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let generated = if usable(request.headers().get(HEADER)).is_some() {
            None
        } else {
            let id = uuid::Uuid::new_v4().to_string();
            if let Ok(value) = http::HeaderValue::from_str(&id) {
                request.headers_mut().insert(HEADER, value);
            }
            Some(id)
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            // The server's span for the call (current while its future runs) left the
            // field empty for a generated id.
            if let Some(id) = generated {
                tracing::Span::current().record("request_id", id.as_str());
            }
            future.await
        })
    }
}
