//! The data plane's front door (DESIGN §19): the accept loop and the HTTP server of the API port.
//!
//! `axum::serve` has no timers and no limits, so a slow or greedy client could hold connections and
//! their memory forever. This serves the API router with hyper directly and adds:
//! - a deadline for each request head (from its first byte; for a new connection, from the accept)
//!   and an idle deadline for kept-alive connections between requests;
//! - `--max-connections`: a connection past it is accepted, answered 503 `overloaded` and closed;
//! - `--max-in-flight`: a request past it is answered 503 `overloaded` (on `/v1/messages`: 529
//!   `overloaded_error`, as Anthropic answers) before its body is read, and a
//!   request stays in flight until the last byte of its answer (streams included);
//! - a panic while serving a request answers 500 (or ends that stream) and is counted;
//! - at most `--http2-max-streams` concurrent streams per HTTP/2 connection.
//!
//! The body-read deadline belongs to the handlers, which read the body only after checking the key.
//!
//! Per request this costs a few atomic operations: the connection's timer is re-armed only when a
//! request head is still incomplete after a read (a slow client), never on the common path.

use crate::errors::ApiError;
use crate::limits::Limits;
use crate::metrics::FrontDoorMetrics;
use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse as _;
use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::CatchUnwind;
use futures_util::task::AtomicWaker;
use http::{HeaderValue, Request, Response, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service as _;

/// Connections past `--max-connections` that are being answered 503 at one time; more are closed
/// without an answer (answering costs a task and a socket for up to [`REFUSAL_LINGER`]).
const MAX_REFUSALS: usize = 256;

/// How long a refused connection may take to read its 503 before the socket closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Handlers for requests the router need not see: the routes clients call on every request go
/// this way, since axum's routing (path lookup, a map of extensions, a boxed service cloned and
/// called) costs ~4% of a request's instructions.
pub trait HotRoutes: Send + Sync + 'static {
    /// Whether [`Self::call`] serves requests of this method and path.
    fn takes(&self, method: &http::Method, path: &str) -> bool;
    /// Serves a request that [`Self::takes`].
    fn call(
        &self,
        request: Request<Body>,
    ) -> futures_util::future::BoxFuture<'static, axum::response::Response>;
}

/// What the API port serves: `hot` first, then `router`.
#[derive(Clone)]
pub struct Routes {
    pub router: Router,
    pub hot: Option<Arc<dyn HotRoutes>>,
}

impl From<Router> for Routes {
    fn from(router: Router) -> Self {
        Self { router, hot: None }
    }
}

/// What every connection shares.
struct Shared {
    limits: Limits,
    router: Router,
    hot: Option<Arc<dyn HotRoutes>>,
    metrics: FrontDoorMetrics,
    builder: auto::Builder<TokioExecutor>,
    /// Live connections, so that a shutdown can ask each one to finish (see [`ConnectionState`]).
    connections: Mutex<HashMap<u64, Arc<ConnectionState>>>,
}

/// Serves `router` on `listener` until `stop` turns true, then lets every connection finish its
/// requests (kept-alive connections close after their current answer). Dropping the returned future
/// closes every connection at once.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    limits: Limits,
    metrics: FrontDoorMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The head deadline is enforced by `ConnectionDriver`; hyper's own would also cut kept-alive
    // connections after the (short) head deadline instead of the idle one.
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .max_concurrent_streams(limits.http2_max_streams);
    let shared = Arc::new(Shared {
        limits,
        router: routes.router,
        hot: routes.hot,
        metrics,
        builder,
        connections: Mutex::new(HashMap::new()),
    });
    let mut tasks = JoinSet::new();
    let mut refusals = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut accept_errors: u32 = 0;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            Some(_) = refusals.join_next(), if !refusals.is_empty() => {}
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => {
                        accept_errors = 0;
                        tcp
                    }
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        accept_errors = accept_errors.saturating_add(1);
                        tracing::warn!(error = %err, "cannot accept a connection");
                        let pause = Duration::from_millis(5u64 << accept_errors.min(7));
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                };
                // Small SSE events must leave at once: without TCP_NODELAY each one after the
                // first waits for the client's delayed ACK (~40 ms).
                if let Err(err) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %err, "cannot set TCP_NODELAY on an accepted connection");
                }
                if shared.metrics.open_connections.inc() >= shared_max(shared.limits.max_connections) {
                    shared.metrics.open_connections.dec();
                    shared.metrics.shed_connection();
                    if refusals.len() < MAX_REFUSALS {
                        refusals.spawn(refuse(tcp));
                    }
                    continue;
                }
                next_id = next_id.wrapping_add(1);
                tasks.spawn(serve_connection(tcp, shared.clone(), next_id));
            }
        }
    }
    drop(listener);
    // Ask every connection to finish: idle ones close now, busy ones after their answer.
    let live: Vec<Arc<ConnectionState>> = match shared.connections.lock() {
        Ok(connections) => connections.values().cloned().collect(),
        Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
    };
    for connection in live {
        connection.ask_to_stop();
    }
    while tasks.join_next().await.is_some() {}
}

fn shared_max(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Answers a connection past `--max-connections` without reading its request, then closes it.
async fn refuse(mut tcp: TcpStream) {
    let body = ApiError::overloaded("too many open connections").body_json();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let answer = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent until it closes: closing with unread bytes would reset the
        // connection and could destroy the answer before the client reads it.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
}

/// Sentinel of [`ConnectionState::head_started_ms`]: no request head has begun since the
/// connection went idle.
const NOT_STARTED: u64 = u64::MAX;

/// One connection's phase, shared by its reader (bytes arriving), its requests (begun, answered)
/// and its driver (the timer).
struct ConnectionState {
    accepted: Instant,
    /// Requests on this connection whose answers have not finished.
    active: AtomicU32,
    /// When the last answer finished (milliseconds after `accepted`).
    idle_since_ms: AtomicU64,
    /// When the first byte of the next request head arrived while idle, or [`NOT_STARTED`]. A new
    /// connection starts its first head at the accept.
    head_started_ms: AtomicU64,
    /// Set when a head begins: the driver may have to arm an earlier deadline.
    rearm: AtomicBool,
    /// HTTP/2 streams have no head phase of their own here; only the idle deadline applies.
    http2: AtomicBool,
    /// Set by a server shutdown; `waker` wakes the driver to act on it.
    stop: AtomicBool,
    waker: AtomicWaker,
}

impl ConnectionState {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            active: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            rearm: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn elapsed_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.accepted).as_millis()).unwrap_or(u64::MAX)
    }

    fn at_ms(&self, ms: u64) -> Instant {
        self.accepted + Duration::from_millis(ms)
    }

    /// Bytes arrived from the client.
    fn bytes_arrived(&self) {
        if self.active.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == NOT_STARTED
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_started_ms
                .store(self.elapsed_ms(Instant::now()), Ordering::Relaxed);
            self.rearm.store(true, Ordering::Release);
        }
    }

    /// A request head was read completely.
    fn request_started(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(NOT_STARTED, Ordering::Relaxed);
    }

    /// The answer of a request finished (or was dropped).
    fn request_finished(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since_ms
                .store(self.elapsed_ms(Instant::now()), Ordering::Relaxed);
        }
    }

    fn ask_to_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// What the connection's timer should do at `now`.
    fn verdict(&self, now: Instant, limits: &Limits) -> Verdict {
        if self.active.load(Ordering::Acquire) > 0 {
            // Busy: answers take as long as they take (the body has its own deadline).
            return Verdict::Wait(now + limits.idle_timeout);
        }
        let now_ms = self.elapsed_ms(now);
        let head = self.head_started_ms.load(Ordering::Relaxed);
        if head != NOT_STARTED && !self.http2.load(Ordering::Relaxed) {
            let deadline = head.saturating_add(millis(limits.header_read_timeout));
            return if now_ms >= deadline {
                Verdict::HeadTooSlow
            } else {
                Verdict::Wait(self.at_ms(deadline))
            };
        }
        let deadline = self
            .idle_since_ms
            .load(Ordering::Relaxed)
            .saturating_add(millis(limits.idle_timeout));
        if now_ms >= deadline {
            Verdict::Idle
        } else {
            Verdict::Wait(self.at_ms(deadline))
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

enum Verdict {
    Wait(Instant),
    /// A request head is not complete within `--header-read-timeout-s`: close.
    HeadTooSlow,
    /// No request for `--idle-timeout-s`: close gracefully.
    Idle,
}

async fn serve_connection(tcp: TcpStream, shared: Arc<Shared>, id: u64) {
    let state = Arc::new(ConnectionState::new());
    if let Ok(mut connections) = shared.connections.lock() {
        connections.insert(id, state.clone());
    }
    let io = TokioIo::new(WatchedIo {
        inner: tcp,
        state: state.clone(),
        first_read: true,
    });
    let gate = Gate {
        shared: shared.clone(),
        connection: state.clone(),
    };
    let connection = Box::pin(shared.builder.serve_connection(io, gate));
    let timer = tokio::time::sleep(shared.limits.header_read_timeout);
    ConnectionDriver {
        connection,
        timer: Box::pin(timer),
        state,
        limits: &shared.limits,
        metrics: &shared.metrics,
        closing: false,
    }
    .await;
    if let Ok(mut connections) = shared.connections.lock() {
        connections.remove(&id);
    }
    shared.metrics.open_connections.dec();
}

/// Drives one hyper connection and its deadlines.
struct ConnectionDriver<'a> {
    connection: Pin<Box<HyperConnection<'a>>>,
    timer: Pin<Box<tokio::time::Sleep>>,
    state: Arc<ConnectionState>,
    limits: &'a Limits,
    metrics: &'a FrontDoorMetrics,
    /// A graceful shutdown was asked for; the connection ends after its current answer.
    closing: bool,
}

type HyperConnection<'a> = auto::Connection<'a, TokioIo<WatchedIo>, Gate, TokioExecutor>;

impl Future for ConnectionDriver<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.state.waker.register(cx.waker());
        if !this.closing && this.state.stop.load(Ordering::Acquire) {
            this.closing = true;
            this.connection.as_mut().graceful_shutdown();
        }
        loop {
            if this.connection.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            if this.state.rearm.swap(false, Ordering::AcqRel) {
                // A head began while idle: its deadline may be sooner than the armed one.
                if let Verdict::Wait(at) = this.state.verdict(Instant::now(), this.limits)
                    && at < this.timer.deadline().into_std()
                {
                    this.timer.as_mut().reset(at.into());
                }
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            match this.state.verdict(now, this.limits) {
                Verdict::Wait(at) => this.timer.as_mut().reset(at.into()),
                Verdict::HeadTooSlow => {
                    this.metrics.client_timeout("header");
                    return Poll::Ready(());
                }
                Verdict::Idle if this.closing => {
                    // Still open one head deadline after the graceful close began (e.g. an HTTP/2
                    // client that ignores GOAWAY): cut it.
                    return Poll::Ready(());
                }
                Verdict::Idle => {
                    this.metrics.client_timeout("idle");
                    this.closing = true;
                    this.connection.as_mut().graceful_shutdown();
                    this.timer
                        .as_mut()
                        .reset((now + this.limits.header_read_timeout).into());
                }
            }
        }
    }
}

/// The client socket, reporting arriving bytes to the connection's state.
struct WatchedIo {
    inner: TcpStream,
    state: Arc<ConnectionState>,
    first_read: bool,
}

impl WatchedIo {
    fn socket(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(&mut self.inner)
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.socket().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                if self.first_read {
                    self.first_read = false;
                    // The HTTP/2 connection preface ("PRI * HTTP/2.0...").
                    if read.starts_with(b"PRI ") {
                        self.state.http2.store(true, Ordering::Relaxed);
                    }
                }
                self.state.bytes_arrived();
            }
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.socket().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.socket().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.socket().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.socket().poll_shutdown(cx)
    }
}

/// The per-connection service in front of the router: in-flight limit, panic catching, and the
/// guard that marks the request finished when its answer is done.
#[derive(Clone)]
struct Gate {
    shared: Arc<Shared>,
    connection: Arc<ConnectionState>,
}

impl hyper::service::Service<Request<Incoming>> for Gate {
    type Response = Response<GuardedBody>;
    type Error = Infallible;
    type Future = GateFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.connection.request_started();
        let mut guard = RequestGuard {
            connection: self.connection.clone(),
            shared: None,
        };
        let metrics = &self.shared.metrics;
        if metrics.in_flight.inc() >= shared_max(self.shared.limits.max_in_flight) {
            metrics.in_flight.dec();
            metrics.shed_request();
            let error = ApiError::overloaded("too many requests in flight");
            // Anthropic clients retry 529 `overloaded_error` (DESIGN §17).
            let mut response = if request.uri().path().starts_with("/v1/messages") {
                error.into_anthropic_response()
            } else {
                error.into_response()
            };
            let headers = response.headers_mut();
            headers.insert(
                crate::server::X_REQUEST_ID,
                crate::server::request_id(request.headers()),
            );
            // The body was not read: the connection cannot be reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            return GateFuture {
                state: GateState::Ready(Some(response)),
                guard: Some(guard),
            };
        }
        guard.shared = Some(self.shared.clone());
        let request = request.map(Body::new);
        if let Some(hot) = &self.shared.hot
            && hot.takes(request.method(), request.uri().path())
        {
            return GateFuture {
                state: GateState::Hot(AssertUnwindSafe(hot.call(request)).catch_unwind()),
                guard: Some(guard),
            };
        }
        let route = self.shared.router.clone().call(request);
        GateFuture {
            state: GateState::Routing(AssertUnwindSafe(route).catch_unwind()),
            guard: Some(guard),
        }
    }
}

/// Marks the request finished on its connection and frees its in-flight slot when dropped (when
/// hyper drops the answer's body: after its last byte, or when the client goes away).
struct RequestGuard {
    connection: Arc<ConnectionState>,
    /// `Some` while the request holds an in-flight slot.
    shared: Option<Arc<Shared>>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.connection.request_finished();
        if let Some(shared) = &self.shared {
            shared.metrics.in_flight.dec();
        }
    }
}

type RouteFuture = axum::routing::future::RouteFuture<Infallible>;

enum GateState {
    Ready(Option<axum::response::Response>),
    Routing(CatchUnwind<AssertUnwindSafe<RouteFuture>>),
    Hot(
        CatchUnwind<
            AssertUnwindSafe<futures_util::future::BoxFuture<'static, axum::response::Response>>,
        >,
    ),
}

pub struct GateFuture {
    state: GateState,
    guard: Option<RequestGuard>,
}

impl Future for GateFuture {
    type Output = Result<Response<GuardedBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = match &mut this.state {
            GateState::Ready(response) => response.take().unwrap_or_default(),
            GateState::Routing(route) => match Pin::new(route).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(response))) => response,
                Poll::Ready(Ok(Err(never))) => match never {},
                Poll::Ready(Err(_panic)) => this.panicked(),
            },
            GateState::Hot(handled) => match Pin::new(handled).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(_panic)) => this.panicked(),
            },
        };
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| GuardedBody { inner: body, guard })))
    }
}

impl GateFuture {
    /// The answer to a request whose handler panicked.
    fn panicked(&self) -> axum::response::Response {
        if let Some(shared) = self.guard.as_ref().and_then(|g| g.shared.as_ref()) {
            shared.metrics.panics.inc();
        }
        tracing::error!("a panic interrupted a request; answered 500");
        ApiError::internal("the gateway failed while serving this request").into_response()
    }
}

/// The answer's body, holding the request's guard until it is dropped.
pub struct GuardedBody {
    inner: Body,
    guard: Option<RequestGuard>,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let inner = Pin::new(&mut this.inner);
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll_frame(cx))) {
            Ok(polled) => polled,
            Err(_panic) => {
                if let Some(shared) = this.guard.as_ref().and_then(|g| g.shared.as_ref()) {
                    shared.metrics.panics.inc();
                }
                tracing::error!("a panic interrupted an answer's body; the connection is closed");
                Poll::Ready(Some(Err(axum::Error::new("the answer failed"))))
            }
        }
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
    #![allow(clippy::unwrap_used)]
    #![allow(
        clippy::disallowed_methods,
        reason = "test tasks end with the test's runtime"
    )]
    use super::*;
    use axum::routing::get;
    use futures_util::StreamExt as _;

    #[tokio::test]
    async fn a_panic_answers_500_or_ends_that_answer_and_the_server_serves_on_hot_routes_too() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route(
                "/panic",
                get(|| async {
                    panic!("deliberate test panic in a handler");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .route(
                "/panic-in-body",
                get(|| async {
                    let chunks = futures_util::stream::iter([1, 2]).map(|i| {
                        assert!(i < 2, "deliberate test panic in a body");
                        Ok::<_, Infallible>(Bytes::from_static(b"first chunk\n"))
                    });
                    Body::from_stream(chunks)
                }),
            )
            .route("/ok", get(|| async { "ok" }))
            .route("/hot", get(|| async { "the router's" }));
        // Hot routes answer before the router; what they do not take goes to the router.
        struct Hot;
        impl HotRoutes for Hot {
            fn takes(&self, _: &http::Method, path: &str) -> bool {
                path.starts_with("/hot")
            }
            fn call(
                &self,
                request: Request<Body>,
            ) -> futures_util::future::BoxFuture<'static, axum::response::Response> {
                if request.uri().path() == "/hot-panic" {
                    Box::pin(async { panic!("deliberate test panic in a hot route") })
                } else {
                    Box::pin(async { "hot".into_response() })
                }
            }
        }
        let hot: Arc<dyn HotRoutes> = Arc::new(Hot);
        let metrics = FrontDoorMetrics::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Routes {
                router,
                hot: Some(hot),
            },
            Limits::default(),
            metrics.clone(),
            stop_rx,
        ));
        let http = reqwest::Client::new();
        let url = |path: &str| format!("http://{addr}{path}");

        let panicked = http.get(url("/panic")).send().await.unwrap();
        assert_eq!(panicked.status(), 500);
        let body: serde_json::Value = panicked.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        // The same kept-alive connection serves the next request.
        let ok = http.get(url("/ok")).send().await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");

        // Cut before or after the head went out (hyper may poll the body before flushing it), but
        // never a clean end.
        if let Ok(broken) = http.get(url("/panic-in-body")).send().await {
            assert!(
                broken.bytes().await.is_err(),
                "a broken body must not end cleanly"
            );
        }
        let ok = http.get(url("/ok")).send().await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");

        assert_eq!(
            http.get(url("/hot"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "hot"
        );
        let panicked = http.get(url("/hot-panic")).send().await.unwrap();
        assert_eq!(panicked.status(), 500);
        let body: serde_json::Value = panicked.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        let ok = http.get(url("/ok")).send().await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");

        assert_eq!(metrics.panics.get(), 3);
        assert_eq!(metrics.in_flight.get(), 0);
        stop_tx.send(true).unwrap();
        drop(http);
        server.await.unwrap();
        assert_eq!(metrics.open_connections.get(), 0);
    }
}
