//! RPC latency histograms (`im_rpc_duration_seconds`, by method and status code): a tower
//! layer around every service of the gRPC port.
//!
//! A call is timed from its request reaching the layer to the end of its response body,
//! where its status travels (trailers, or the headers of a trailers-only answer): a unary
//! call's whole answer, and a stream's whole duration (WatchOperation, TailLogs with
//! `follow` last as long as their client wants, which is what the method's series then
//! shows). A response dropped before it ended (the client went away) counts as
//! `CANCELLED`. The layer sits inside gRPC-Web's translation, so browser calls are timed
//! like native ones, and outside authentication, so refused calls count too.
//!
//! Methods are labelled only when the server serves them; any other path is `other`, so
//! callers cannot grow the number of series.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::metrics::{self, Metrics};

/// The label of a method this server does not serve.
pub const OTHER_METHOD: &str = "other";

/// The canonical name of a gRPC status code (`grpc-status` value; unknown values are
/// `UNKNOWN`).
pub fn code_name(code: i32) -> &'static str {
    crate::api::error::code_name(tonic::Code::from_i32(code))
}

fn status_of(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
}

/// The paths (`/package.Service/Method`) of every method in the encoded descriptor sets.
pub fn served_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    let mut methods = HashSet::new();
    for set in descriptor_sets {
        let Ok(pool) = prost_reflect::DescriptorPool::decode(*set) else {
            tracing::warn!("cannot decode a descriptor set: its methods are labelled other");
            continue;
        };
        for service in pool.services() {
            for method in service.methods() {
                methods.insert(format!("/{}/{}", service.full_name(), method.name()));
            }
        }
    }
    // Reflection's descriptors are not among ours.
    for service in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        methods.insert(format!("/{service}/ServerReflectionInfo"));
    }
    methods
}

/// Times every call through it into `metrics` (nothing when `None`).
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Option<Arc<Metrics>>,
    methods: Arc<HashSet<String>>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Option<Arc<Metrics>>, methods: HashSet<String>) -> Self {
        Self {
            metrics,
            methods: Arc::new(methods),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl<S, B> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(metrics) = self.layer.metrics.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path();
        let method: Arc<str> = if self.layer.methods.contains(path) {
            path.into()
        } else {
            OTHER_METHOD.into()
        };
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let (parts, body) = response.into_parts();
            let mut timer = CallTimer {
                metrics: Some(metrics),
                method,
                started,
                header_code: status_of(&parts.headers),
            };
            // A trailers-only answer (every error a handler returns) is complete here: its
            // empty body may never be polled.
            if timer.header_code.is_some() {
                timer.record(None);
            }
            let body = tonic::body::Body::new(TimedBody { inner: body, timer });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// Records one call once: when its body ends, or when it is dropped before.
struct CallTimer {
    /// Taken when recorded.
    metrics: Option<Arc<Metrics>>,
    method: Arc<str>,
    started: Instant,
    /// The status of a trailers-only answer.
    header_code: Option<i32>,
}

impl CallTimer {
    fn record(&mut self, code: Option<i32>) {
        let Some(metrics) = self.metrics.take() else {
            return;
        };
        // No status at all is what tonic never sends; count it as gRPC would read it.
        let code = code.or(self.header_code).unwrap_or(2);
        metrics.observe(
            metrics::RPC_DURATION,
            &[("method", &self.method), ("code", code_name(code))],
            self.started.elapsed().as_secs_f64(),
        );
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the server is stopping).
        self.record(Some(1));
    }
}

struct TimedBody {
    inner: tonic::body::Body,
    timer: CallTimer,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.timer.record(status_of(trailers));
                }
            }
            Poll::Ready(Some(Err(status))) => this.timer.record(Some(status.code() as i32)),
            Poll::Ready(None) => this.timer.record(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_labelled() {
        let methods = served_methods(&[crate::proto::FILE_DESCRIPTOR_SET]);
        assert!(methods.contains("/bbws.instance.v1.InstanceService/GetInstance"));
        assert!(methods.contains("/google.longrunning.Operations/GetOperation"));
        assert!(!methods.contains("/bbws.instance.v1.InstanceService/NoSuchMethod"));
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(99), "UNKNOWN");
    }
}
