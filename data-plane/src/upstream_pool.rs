//! The hot path's upstream connections (DESIGN §15): hyper's client connections
//! (`hyper::client::conn::{http1, http2}`) over the TLS connector, kept per upstream host.
//!
//! Why not hyper-util's pooled `legacy::Client`, which this replaces: measured with callgrind, its
//! checkout (the pool key `(scheme, authority)` hashed byte by byte with SipHash, a waiter and
//! connect race per call), the pooled handle's return, and the task it spawns after every HTTP/1
//! answer to put the connection back cost ~8,000 instructions per request, a tenth of the
//! request. Here an HTTP/1 connection goes back to its host's list as soon as the request is
//! handed to it; it is busy (not ready) until its answer has been read, and a checkout takes the
//! most recently used connection that is ready. An HTTP/2 connection (ALPN `h2`) is shared by
//! every request to its host.
//!
//! What the legacy client did and this keeps: ALPN per connection, `Host` on HTTP/1 requests
//! (origin-form request line), absolute URIs on HTTP/2, idle connections dropped after
//! [`POOL_IDLE_TIMEOUT`], at most [`POOL_MAX_IDLE_PER_HOST`] kept per host, and one retry on a
//! fresh connection when a reused one turns out closed before the request was written (an
//! upstream closes idle keep-alive connections when it likes; nothing was sent, so nothing is
//! billed twice).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service as _;

use crate::upstream_http::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST, SendError, error_chain};

type Body = Full<Bytes>;

/// Connections to upstream hosts, made on demand.
pub struct UpstreamPool {
    connector: HttpsConnector<HttpConnector>,
    /// By `scheme://authority`; the map is looked up once per call (a short string hash).
    hosts: Mutex<HashMap<Box<str>, Arc<Host>>>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    /// Time origin of `last_sweep`.
    started: Instant,
    /// When idle connections were last dropped across every host (ms since `started`).
    last_sweep: AtomicU64,
}

/// The connections to one upstream host.
#[derive(Default)]
struct Host {
    /// HTTP/1 connections, busy or ready, the most recently used last.
    http1: Mutex<Vec<Http1Connection>>,
    /// The HTTP/2 connection, once the host has negotiated `h2`, and when it was last used.
    http2: Mutex<Option<(http2::SendRequest<Body>, Instant)>>,
}

struct Http1Connection {
    sender: http1::SendRequest<Body>,
    /// When it was last given a request.
    used: Instant,
}

/// A connection a request can be sent on.
enum Checkout {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data, valid after any panic: a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("hosts", &lock(&self.hosts).len())
            .finish_non_exhaustive()
    }
}

impl UpstreamPool {
    pub fn new(connector: HttpsConnector<HttpConnector>) -> Self {
        Self::with_idle_timeout(connector, POOL_IDLE_TIMEOUT)
    }

    /// As [`Self::new`], with connections dropped after `idle_timeout` unused (tests).
    pub fn with_idle_timeout(
        connector: HttpsConnector<HttpConnector>,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            connector,
            hosts: Mutex::new(HashMap::new()),
            idle_timeout,
            max_idle_per_host: POOL_MAX_IDLE_PER_HOST,
            started: Instant::now(),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Sends `request` (an absolute URI) and waits for the answer's head.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let now = Instant::now();
        self.sweep_when_due(now);
        let host = self.host(request.uri())?;
        let mut request = request;
        // A reused HTTP/1 connection may have been closed by the upstream while idle; the request
        // comes back unsent, and goes once more on a fresh connection.
        let mut fresh_only = false;
        loop {
            let (checkout, reused) = match (!fresh_only)
                .then(|| host.checkout(now, self.idle_timeout))
                .flatten()
            {
                Some(checkout) => (checkout, true),
                // Boxed: the connect future (TCP, TLS, HTTP/2 handshakes) is large, and would
                // otherwise make every call's future, copied on each request, that large.
                None => (
                    Box::pin(self.connect(&host, request.uri(), now)).await?,
                    false,
                ),
            };
            match checkout {
                Checkout::Http2(mut sender) => {
                    return sender
                        .send_request(request)
                        .await
                        .map_err(|err| sent_error(&err));
                }
                Checkout::Http1(mut sender) => {
                    let absolute = request.uri().clone();
                    to_origin_form(&mut request)?;
                    let answer = sender.try_send_request(request);
                    host.give_back(sender, now, self.max_idle_per_host);
                    match answer.await {
                        Ok(response) => return Ok(response),
                        Err(mut err) => match err.take_message() {
                            Some(mut unsent) if reused => {
                                *unsent.uri_mut() = absolute;
                                unsent.headers_mut().remove(HOST);
                                request = unsent;
                                fresh_only = true;
                            }
                            _ => return Err(sent_error(err.error())),
                        },
                    }
                }
            }
        }
    }

    /// Once per idle timeout, drops the connections idle for longer than that across every
    /// host, and the hosts left without any (a host no longer called keeps nothing open).
    fn sweep_when_due(&self, now: Instant) {
        let elapsed = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        let last = self.last_sweep.load(Ordering::Relaxed);
        let period = u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        if elapsed.saturating_sub(last) < period
            || self
                .last_sweep
                .compare_exchange(last, elapsed, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        lock(&self.hosts).retain(|_, host| host.drop_idle(now, self.idle_timeout));
    }

    fn host(&self, uri: &Uri) -> Result<Arc<Host>, SendError> {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(SendError {
                connect: true,
                detail: "the upstream URL has no scheme or host".to_owned(),
            });
        };
        let mut key = String::with_capacity(scheme.len() + 3 + authority.as_str().len());
        key.push_str(scheme);
        key.push_str("://");
        key.push_str(authority.as_str());
        let mut hosts = lock(&self.hosts);
        if let Some(host) = hosts.get(key.as_str()) {
            return Ok(Arc::clone(host));
        }
        let host = Arc::new(Host::default());
        hosts.insert(key.into_boxed_str(), Arc::clone(&host));
        Ok(host)
    }

    /// A new connection to `uri`'s host: TCP (and TLS, with ALPN), then HTTP/1 or HTTP/2 as
    /// negotiated. Its driver runs as a task of its own until the connection closes.
    async fn connect(&self, host: &Host, uri: &Uri, now: Instant) -> Result<Checkout, SendError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|err| connect_error(&*err))?;
        let io = connector
            .call(uri.clone())
            .await
            .map_err(|err| connect_error(&*err))?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|err| connect_error(&err))?;
            spawn_driver(connection);
            *lock(&host.http2) = Some((sender.clone(), now));
            Ok(Checkout::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io)
                .await
                .map_err(|err| connect_error(&err))?;
            spawn_driver(connection);
            Ok(Checkout::Http1(sender))
        }
    }
}

impl Host {
    /// The host's HTTP/2 connection, else its most recently used ready HTTP/1 connection. Drops
    /// closed connections, and idle ones unused for longer than `idle_timeout`, on the way.
    fn checkout(&self, now: Instant, idle_timeout: Duration) -> Option<Checkout> {
        {
            let mut http2 = lock(&self.http2);
            match &mut *http2 {
                Some((sender, used)) if !sender.is_closed() => {
                    *used = now;
                    return Some(Checkout::Http2(sender.clone()));
                }
                Some(_) => *http2 = None,
                None => {}
            }
        }
        let mut connections = lock(&self.http1);
        let mut i = connections.len();
        while i > 0 {
            i -= 1;
            let connection = &connections[i];
            if connection.sender.is_closed() {
                connections.remove(i);
            } else if connection.sender.is_ready() {
                if now.saturating_duration_since(connection.used) > idle_timeout {
                    connections.remove(i);
                } else {
                    return Some(Checkout::Http1(connections.remove(i).sender));
                }
            }
        }
        None
    }

    /// Keeps an HTTP/1 connection that was just given a request: it is ready again once its
    /// answer has been read. Beyond `max` kept, it is dropped, which closes it after that answer.
    fn give_back(&self, sender: http1::SendRequest<Body>, now: Instant, max: usize) {
        let mut connections = lock(&self.http1);
        if connections.len() < max {
            connections.push(Http1Connection { sender, used: now });
        }
    }

    /// Drops closed connections and ready ones unused for longer than `idle_timeout` (a busy
    /// one, e.g. a long stream, stays); true while the host keeps any.
    fn drop_idle(&self, now: Instant, idle_timeout: Duration) -> bool {
        let stale = |used: Instant| now.saturating_duration_since(used) > idle_timeout;
        let mut http2 = lock(&self.http2);
        if http2
            .as_ref()
            .is_some_and(|(sender, used)| sender.is_closed() || stale(*used))
        {
            *http2 = None;
        }
        let mut connections = lock(&self.http1);
        connections.retain(|c| !(c.sender.is_closed() || (c.sender.is_ready() && stale(c.used))));
        http2.is_some() || !connections.is_empty()
    }
}

/// HTTP/1's request line carries the path and query only; the host goes in `Host`.
fn to_origin_form(request: &mut Request<Body>) -> Result<(), SendError> {
    if !request.headers().contains_key(HOST) {
        let host = host_value(request.uri()).ok_or_else(|| SendError {
            connect: true,
            detail: "the upstream URL has no valid host".to_owned(),
        })?;
        request.headers_mut().insert(HOST, host);
    }
    let origin = match request.uri().path_and_query() {
        Some(path) => Uri::from(path.clone()),
        None => Uri::from_static("/"),
    };
    *request.uri_mut() = origin;
    Ok(())
}

fn connect_error(err: &(dyn std::error::Error + 'static)) -> SendError {
    SendError {
        connect: true,
        detail: format!("connect error: {}", error_chain(err)),
    }
}

fn sent_error(err: &hyper::Error) -> SendError {
    SendError {
        connect: false,
        detail: error_chain(err),
    }
}

fn spawn_driver<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    #[allow(
        clippy::disallowed_methods,
        reason = "a connection's driver: it ends when the connection closes, which dropping every sender of it causes"
    )]
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %error_chain(&err), "upstream connection closed");
        }
    });
}

/// `Host` for a URI's authority: the host, and the port unless it is the scheme's default.
pub(crate) fn host_value(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    #![allow(
        clippy::disallowed_methods,
        reason = "test tasks end with the test's runtime"
    )]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use crate::upstream_http::UpstreamHttp;

    /// An HTTP/1.1 upstream that answers `ok` to every request and records the request heads.
    /// It closes its first connection after one answer, without saying so (no
    /// `connection: close`), as an upstream does with an idle keep-alive connection.
    #[derive(Default)]
    struct Upstream {
        accepted: AtomicUsize,
        heads: Mutex<Vec<String>>,
        /// Answers wait until this many requests have arrived (0: at once).
        hold_until: AtomicUsize,
        arrived: tokio::sync::Notify,
        /// Keeps its first connection open like the others.
        keep_first: bool,
        /// Connections the client closed.
        closed: AtomicUsize,
    }

    async fn serve(listener: TcpListener, upstream: Arc<Upstream>) {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let n = upstream.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(connection(stream, n, Arc::clone(&upstream)));
        }
    }

    async fn connection(mut stream: TcpStream, n: usize, upstream: Arc<Upstream>) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let read = stream.read(&mut chunk).await.unwrap_or(0);
                if read == 0 {
                    upstream.closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                buf.extend_from_slice(&chunk[..read]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < head_end + length {
                let mut chunk = [0u8; 4096];
                let read = stream.read(&mut chunk).await.unwrap();
                assert!(read > 0, "body cut short");
                buf.extend_from_slice(&chunk[..read]);
            }
            buf.drain(..head_end + length);
            lock(&upstream.heads).push(head);
            upstream.arrived.notify_waiters();
            let hold = upstream.hold_until.load(Ordering::SeqCst);
            loop {
                let arrived = upstream.arrived.notified();
                tokio::pin!(arrived);
                // Registered before the check, so a request arriving in between is not missed.
                arrived.as_mut().enable();
                if lock(&upstream.heads).len() >= hold {
                    break;
                }
                arrived.await;
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            if n == 0 && !upstream.keep_first {
                return;
            }
        }
    }

    async fn upstream() -> (Arc<Upstream>, String) {
        upstream_with(Upstream::default()).await
    }

    async fn upstream_with(upstream: Upstream) -> (Arc<Upstream>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(upstream);
        tokio::spawn(serve(listener, Arc::clone(&upstream)));
        (upstream, format!("127.0.0.1:{}", addr.port()))
    }

    async fn call_pool(pool: &UpstreamPool, authority: &str) -> String {
        let request = Request::post(format!("http://{authority}/v1/chat/completions"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = pool.send(request).await.expect("answered");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn call(client: &UpstreamHttp, authority: &str) -> String {
        let request = Request::post(format!("http://{authority}/v1/chat/completions?x=1"))
            .header("content-type", "application/json")
            .body(Bytes::from_static(b"{\"model\":\"m\"}"))
            .unwrap();
        let response = client.send(request).await.expect("answered");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn http1_connections_are_reused_and_one_the_upstream_closed_is_replaced() {
        let (upstream, authority) = upstream().await;
        let client = UpstreamHttp::hyper().unwrap();
        // The first connection is closed by the upstream after this answer.
        assert_eq!(call(&client, &authority).await, "ok");
        // Whether or not the client has noticed the close yet, the request is answered (a stale
        // connection gives the unsent request back, which goes again on a new one).
        assert_eq!(call(&client, &authority).await, "ok");
        // The second connection stays open and serves the next ones.
        assert_eq!(call(&client, &authority).await, "ok");
        assert_eq!(call(&client, &authority).await, "ok");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
        let heads = lock(&upstream.heads).clone();
        assert_eq!(heads.len(), 4);
        for head in &heads {
            // Origin-form request line, the host in `Host`.
            assert!(
                head.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(
                head.contains(&format!("\r\nhost: {authority}\r\n")),
                "{head}"
            );
            assert_eq!(head.matches("host: ").count(), 1, "{head}");
        }
    }

    #[tokio::test]
    async fn concurrent_requests_get_connections_of_their_own_then_share_them() {
        let (upstream, authority) = upstream().await;
        let client = UpstreamHttp::hyper().unwrap();
        // Warm up past the connection the upstream closes after one answer.
        call(&client, &authority).await;
        call(&client, &authority).await;
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
        // Neither answer comes before both requests have arrived: the second one cannot wait
        // for the first one's connection.
        upstream.hold_until.store(4, Ordering::SeqCst);
        let (a, b) = tokio::join!(call(&client, &authority), call(&client, &authority));
        assert_eq!((a.as_str(), b.as_str()), ("ok", "ok"));
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
        upstream.hold_until.store(0, Ordering::SeqCst);
        // Both connections are back and ready: sequential calls open none.
        for _ in 0..4 {
            call(&client, &authority).await;
        }
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed_even_to_a_host_no_longer_called() {
        let keep = || Upstream {
            keep_first: true,
            ..Upstream::default()
        };
        let (a, a_authority) = upstream_with(keep()).await;
        let (b, b_authority) = upstream_with(keep()).await;
        let connector = crate::upstream_http::connector().unwrap();
        let idle_timeout = Duration::from_millis(200);
        let pool = UpstreamPool::with_idle_timeout(connector, idle_timeout);
        assert_eq!(call_pool(&pool, &a_authority).await, "ok");
        assert_eq!(call_pool(&pool, &a_authority).await, "ok");
        assert_eq!(
            a.accepted.load(Ordering::SeqCst),
            1,
            "reused within the timeout"
        );
        // The time passing is what is tested here.
        tokio::time::sleep(idle_timeout + Duration::from_millis(50)).await;
        // A call to another host sweeps every host: A's idle connection is closed.
        assert_eq!(call_pool(&pool, &b_authority).await, "ok");
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.closed.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "A's idle connection is still open"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(lock(&pool.hosts).len(), 1, "only B is left");
        assert_eq!(
            b.closed.load(Ordering::SeqCst),
            0,
            "B's connection was just used"
        );
        // A's next call opens a new connection.
        assert_eq!(call_pool(&pool, &a_authority).await, "ok");
        assert_eq!(a.accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn host_values_omit_the_default_port() {
        let host = |uri: &str| host_value(&uri.parse().unwrap()).unwrap();
        assert_eq!(host("http://api.example.com/v1"), "api.example.com");
        assert_eq!(host("http://api.example.com:80/v1"), "api.example.com");
        assert_eq!(host("http://10.0.0.7:8080/v1"), "10.0.0.7:8080");
        assert_eq!(host("https://api.example.com:443/v1"), "api.example.com");
        assert_eq!(
            host("https://api.example.com:8443/v1"),
            "api.example.com:8443"
        );
        assert_eq!(host("https://[::1]:8443/v1"), "[::1]:8443");
    }
}
