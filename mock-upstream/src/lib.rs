//! One faithful mock of every upstream the gateway calls (DESIGN §14): OpenAI and Azure OpenAI
//! chat completions and embeddings ([`openai`]) and their Responses API with stored responses
//! ([`responses`], DESIGN §17), Google AI Studio and Vertex AI ([`google`]), AWS Bedrock Runtime
//! ([`bedrock`]), and the Anthropic Messages API as the Anthropic API, Azure Foundry, Bedrock
//! (InvokeModel and its Messages endpoint) and Vertex serve it ([`anthropic`], DESIGN §17).
//! The Rust tests start it in process ([`MockUpstream::start`]); the e2e suite and the benchmark
//! run the `llm-proxy-mock-upstream` binary.
//!
//! It records every request exactly as received (method, raw percent-encoded path, query,
//! headers, body: [`Recorded`]'s `headers` and `body` are the received header map and bytes, and
//! `GET /__mock/requests` lists them with the body as text and as `body_base64`), authenticates like the provider (API keys, Azure `api-key`, Google API keys,
//! Bearer tokens and service-account JWT exchanges, Bedrock API keys and AWS Signature V4
//! recomputed independently of the signer, see the `sigv4` module), and answers with the providers'
//! documented or captured shapes: where each comes from is recorded in `fixtures/README.md`.
//!
//! One server serves every provider: the request path tells them apart (`/model/…` is Bedrock,
//! `/v1/messages…` and `/anthropic/v1/messages…` are Anthropic, except that the latter with
//! Bedrock credentials is Bedrock's Messages endpoint; a `:method` suffix or `/token` is Google,
//! Claude on Vertex included; a path ending in `/responses`, `/responses/{id}` or
//! `/responses/{id}/input_items` is the Responses API of OpenAI, of Azure v1 under `/openai/v1/`
//! or of Azure's dated API under `/openai/`; the rest is OpenAI-shaped). Words in the request
//! body steer the misbehaviours tests need (see each module: `RATELIMITME`, `HOLDME`,
//! `NOTJSON`, …); tests observe them through [`MockState`]. The remote model name the gateway
//! sends steers the OpenAI answers' contents: `server-error` answers OpenAI's 500, `usage-P-C`
//! reports P prompt and C completion tokens (see [`openai`]).
//!
//! Every provider request, once recorded, passes [`MockState::gate`]: a semaphore with a very
//! large number of permits, so that a test can hold requests at the mock
//! (`mock.state.gate.forget_permits(usize::MAX)`) and let them go (`add_permits(n)`); the
//! requests that arrived meanwhile are in [`MockUpstream::requests`].

pub mod anthropic;
#[cfg(test)]
mod anthropic_tests;
pub mod bedrock;
pub mod bench;
pub mod golden;
pub mod google;
pub mod openai;
mod recorded;
pub mod responses;
#[cfg(test)]
mod responses_tests;
pub mod sigv4;
#[cfg(test)]
mod steering_tests;

pub use recorded::Recorded;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use serde_json::Value;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{Notify, Semaphore};

/// What tests observe and steer: the recorded requests and the hooks of the slow behaviours.
#[derive(Debug, Default)]
pub struct MockState {
    seen: Mutex<Vec<Recorded>>,
    /// Numbers the request ids the mock answers with.
    next_id: AtomicU64,
    /// A `HOLDME` request signals `held` on arrival and answers only after `release`.
    pub held: Notify,
    pub release: Notify,
    /// Signalled when a `SLOWSTREAM` answer's body is dropped (the gateway closed the connection).
    pub stream_dropped: Notify,
    /// Bytes of the oversized bodies handed to the connection so far: what the gateway made the
    /// mock send.
    pub produced: Arc<AtomicUsize>,
    /// Google's token endpoint: the tokens it issued and the exchanges it refused.
    pub google_tokens: google::TokenBook,
    /// The Responses API's stored responses: this mock's "account" (see [`responses`]).
    pub responses: responses::Store,
    /// Every provider request waits here for a permit after it is recorded (and gives it back
    /// at once). Take the permits away to hold requests, add some to release them.
    pub gate: RequestGate,
}

/// The semaphore of [`MockState::gate`]: it starts with [`Semaphore::MAX_PERMITS`] permits, so
/// requests pass until a test takes them away (`forget_permits`), and pass again once it adds
/// some (`add_permits`).
#[derive(Debug)]
pub struct RequestGate(Semaphore);

impl Default for RequestGate {
    fn default() -> Self {
        Self(Semaphore::new(Semaphore::MAX_PERMITS))
    }
}

impl std::ops::Deref for RequestGate {
    type Target = Semaphore;

    fn deref(&self) -> &Semaphore {
        &self.0
    }
}

impl RequestGate {
    /// Waits until a permit is available (it is given back at once).
    async fn pass(&self) {
        // Closed only if a test closed it: then nothing is held any more.
        drop(self.0.acquire().await);
    }
}

impl MockState {
    fn record(&self, request: Recorded) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// A fresh request id (a number, for the providers' own formats).
    pub fn next_request_number(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }
}

/// A mock upstream serving on a local port.
#[derive(Debug, Clone)]
pub struct MockUpstream {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub state: Arc<MockState>,
}

impl MockUpstream {
    /// Serves on a free loopback port until the runtime ends.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(MockState::default());
        let app = router(state.clone());
        #[allow(
            clippy::disallowed_methods,
            reason = "test server: lives as long as the runtime"
        )]
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base, state })
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests()
    }

    /// The last request received, if any.
    pub fn last(&self) -> Option<Recorded> {
        self.state.requests().pop()
    }
}

/// The mock's whole HTTP surface over `state`: `/__mock/requests` (GET: the recorded requests as
/// JSON, DELETE: forget them) and every provider's API.
pub fn router(state: Arc<MockState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// Which provider a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    Responses,
    Anthropic,
    Google,
    Bedrock,
    Control,
}

fn provider_of(recorded: &Recorded) -> Provider {
    let path = recorded.path.as_str();
    if path == "/__mock/requests" {
        Provider::Control
    } else if path.starts_with("/model/") {
        Provider::Bedrock
    } else if anthropic::is_messages_path(path) {
        // Foundry and Bedrock share `/anthropic/v1/messages`: the credentials tell them apart.
        if path.starts_with("/anthropic/") && anthropic::has_bedrock_credentials(recorded) {
            Provider::Bedrock
        } else {
            Provider::Anthropic
        }
    } else if google::is_google_path(path) {
        Provider::Google
    } else if responses::is_responses_path(path) {
        Provider::Responses
    } else {
        Provider::OpenAi
    }
}

async fn dispatch(State(state): State<Arc<MockState>>, request: Request) -> Response {
    let recorded = match Recorded::read(request).await {
        Ok(recorded) => recorded,
        Err(err) => return (StatusCode::BAD_REQUEST, err).into_response(),
    };
    match provider_of(&recorded) {
        Provider::Control => control(&state, &recorded.method),
        Provider::OpenAi => {
            state.record(recorded.clone());
            state.gate.pass().await;
            openai::answer(&state, recorded).await
        }
        Provider::Responses => {
            state.record(recorded.clone());
            state.gate.pass().await;
            responses::answer(&state, recorded).await
        }
        Provider::Anthropic => {
            state.record(recorded.clone());
            state.gate.pass().await;
            anthropic::answer(&state, recorded).await
        }
        Provider::Google => {
            state.record(recorded.clone());
            state.gate.pass().await;
            google::answer(&state, recorded).await
        }
        Provider::Bedrock => {
            // The id is chosen before recording, so tests can compare it with the gateway's.
            let recorded = bedrock::with_request_id(&state, recorded).await;
            state.record(recorded.clone());
            state.gate.pass().await;
            bedrock::answer(&state, recorded).await
        }
    }
}

fn control(state: &MockState, method: &Method) -> Response {
    match *method {
        Method::GET => {
            let requests: Vec<Value> = state.requests().iter().map(Recorded::to_json).collect();
            json_response(StatusCode::OK, &Value::Array(requests))
        }
        Method::DELETE => {
            state.clear();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

/// `body` as `application/json` with `status`.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A body of `prefix` then `total - prefix.len()` bytes of `fill`, produced 64 KiB at a time
/// only as the reader pulls them (never all in memory); `produced` counts the bytes handed out.
pub fn lazy_body(
    prefix: &'static [u8],
    fill: u8,
    total: usize,
    produced: Arc<AtomicUsize>,
) -> Body {
    const PIECE: usize = 64 * 1024;
    let piece = Bytes::from(vec![fill; PIECE]);
    let rest = total.saturating_sub(prefix.len());
    let pieces = std::iter::once(Bytes::from_static(prefix))
        .chain((0..rest.div_ceil(PIECE)).map(move |i| {
            let len = PIECE.min(rest - i * PIECE);
            piece.slice(..len)
        }))
        .map(move |piece| {
            produced.fetch_add(piece.len(), Ordering::Relaxed);
            Ok::<_, Infallible>(piece)
        });
    Body::from_stream(futures_util::stream::iter(pieces))
}
