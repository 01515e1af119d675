//! The OpenAI Responses API passed through to `openai` and `azure` connections (DESIGN §17).
//!
//! The client's body goes upstream byte for byte except `model` (the remote name, or the Azure
//! deployment) and `previous_response_id` (untagged, below); the answer comes back as it is
//! except the response ids, which are tagged; the stream is relayed event by event as it arrives
//! and only the lifecycle events that carry the response object (`response.created`, `…completed`
//! …) are parsed, to tag the id and to read the usage (incl. cached and reasoning tokens).
//!
//! **Stored state in pools.** OpenAI and Azure store responses per account/resource, so
//! `previous_response_id`, retrieve, delete and input items must reach the connection that
//! created the response, also when the alias pools several connections. The gateway returns
//! response ids tagged with that connection: `resp_` + base64url(`llmp1\n{connection id}\n{upstream
//! id}`), opaque to clients, and reads the tag back on the way in. Ids without a tag (a response
//! created outside the gateway) pass on unchanged to whichever target the pool picks.

use crate::body::{self, ParsedRequest};
use crate::errors::ApiError;
use crate::inbound::Operation;
use crate::index::ConnectionEntry;
use crate::sse::{EventSplitter, StreamTranslator, data_of, event_too_large, stream_truncated};
use crate::usage::Usage;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{Bytes, BytesMut};
use llm_proxy_catalog::Provider;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Marks an id the gateway tagged (and the tag's format version).
const TAG_MAGIC: &str = "llmp1";
/// Longest upstream id or connection id a tag may hold (OpenAI's ids are ~53 characters).
const MAX_TAGGED_PART: usize = 256;

/// A response id as the gateway hands it out: the upstream id tagged with its connection.
pub fn tag_id(connection_id: &str, upstream_id: &str) -> String {
    let mut inner =
        Vec::with_capacity(TAG_MAGIC.len() + connection_id.len() + upstream_id.len() + 2);
    for (i, part) in [TAG_MAGIC, connection_id, upstream_id]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            inner.push(b'\n');
        }
        inner.extend_from_slice(part.as_bytes());
    }
    let mut id = String::with_capacity(5 + inner.len().div_ceil(3) * 4);
    id.push_str("resp_");
    URL_SAFE_NO_PAD.encode_string(inner, &mut id);
    id
}

/// A response id the gateway tagged: the connection that stored it and the upstream's own id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedId {
    pub connection_id: String,
    pub upstream_id: String,
}

/// Reads the tag of an id the gateway handed out; `None` for any other id. The upstream id must
/// be a plain token (letters, digits, `_`, `-`): it goes into URL paths.
pub fn untag_id(id: &str) -> Option<TaggedId> {
    let encoded = id.strip_prefix("resp_")?;
    if encoded.len() > 4 * MAX_TAGGED_PART {
        return None;
    }
    let decoded = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let mut parts = text.splitn(3, '\n');
    let (magic, connection_id, upstream_id) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_TAGGED_PART
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    (magic == TAG_MAGIC && token(connection_id) && token(upstream_id)).then(|| TaggedId {
        connection_id: connection_id.to_owned(),
        upstream_id: upstream_id.to_owned(),
    })
}

/// The request's `previous_response_id`, if it names one: `Ok(None)` when absent or null.
pub fn previous_response_id<'a>(request: &ParsedRequest<'a>) -> Result<Option<String>, ApiError> {
    match request.object.get("previous_response_id") {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| {
                ApiError::invalid_request("`previous_response_id` must be a string")
                    .with_param("previous_response_id")
            }),
    }
}

/// The connection a request's `previous_response_id` pins it to (DESIGN §17), if tagged.
pub fn pinned_connection(request: &ParsedRequest<'_>) -> Result<Option<TaggedId>, ApiError> {
    Ok(previous_response_id(request)?.as_deref().and_then(untag_id))
}

/// The body an OpenAI or Azure Responses endpoint gets: the client's bytes with `model` set to
/// `model_in_body` and a tagged `previous_response_id` replaced by the upstream's own id.
pub fn passthrough_body(
    body: &[u8],
    request: &ParsedRequest<'_>,
    connection: &ConnectionEntry,
    model_in_body: &str,
) -> Result<Vec<u8>, ApiError> {
    let model = format!("\"model\":{}", body::json_string(model_in_body));
    let mut members: Vec<(&str, &str)> = vec![("model", &model)];
    let previous;
    if let Some(tagged) = pinned_connection(request)? {
        if tagged.connection_id != connection.id {
            // The route follows the tag (server.rs); reaching here is a routing bug.
            return Err(ApiError::internal(
                "a previous_response_id was routed to another connection than the one that stored it",
            ));
        }
        previous = format!(
            "\"previous_response_id\":{}",
            body::json_string(&tagged.upstream_id)
        );
        members.push(("previous_response_id", &previous));
    }
    body::replace_members(body, &request.object, &members).ok_or_else(|| {
        ApiError::invalid_request("you must provide a model parameter").with_param("model")
    })
}

/// What the gateway does with a passed-through Responses answer: tag the ids with the connection.
#[derive(Debug)]
pub struct ResponsesAnswer {
    pub connection_id: String,
}

/// The Responses API's usage object: `input_tokens` counts the cached ones and `output_tokens`
/// the reasoning ones, as OpenAI chat's counts do.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ResponsesUsage {
    input_tokens: u64,
    input_tokens_details: Option<InputDetails>,
    output_tokens: u64,
    output_tokens_details: Option<OutputDetails>,
    total_tokens: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct InputDetails {
    cached_tokens: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OutputDetails {
    reasoning_tokens: u64,
}

impl ResponsesUsage {
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.input_tokens,
            completion_tokens: self.output_tokens,
            total_tokens: self.total_tokens,
            cache_read_tokens: self
                .input_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens),
            // The Responses API reports no cache writes.
            cache_write_tokens: 0,
            reasoning_tokens: self
                .output_tokens_details
                .as_ref()
                .map_or(0, |d| d.reasoning_tokens),
        }
    }
}

fn bad_answer(provider: &str) -> ApiError {
    ApiError::upstream_bad_answer(provider, "a 2xx answer that is not a JSON object")
}

/// The members of a response object the gateway reads, borrowed from the answer: one pass
/// over the JSON (which also validates it), no copies of the other members.
#[derive(Deserialize)]
struct ResponseProbe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

/// A lifecycle event (`{"type":…,"response":{…}}`).
#[derive(Deserialize)]
struct LifecycleProbe<'a> {
    #[serde(borrow)]
    response: ResponseProbe<'a>,
}

impl ResponseProbe<'_> {
    /// The usage it reports; an unreadable `usage` counts as none (the estimate stands).
    fn usage(&self) -> Option<Usage> {
        let raw = self.usage?;
        serde_json::from_str::<ResponsesUsage>(raw.get())
            .ok()
            .map(|u| u.usage())
    }
}

/// The string a raw JSON value holds, if it is one (ids are plain tokens: borrowed unless
/// escaped).
fn raw_string(raw: &RawValue) -> Option<std::borrow::Cow<'_, str>> {
    if let Ok(text) = serde_json::from_str::<&str>(raw.get()) {
        return Some(text.into());
    }
    serde_json::from_str::<String>(raw.get())
        .ok()
        .map(Into::into)
}

impl ResponsesAnswer {
    /// A response object (an answer, a retrieved response, a delete confirmation) with its `id`
    /// and `previous_response_id` tagged, and the usage it reports.
    pub fn translate(
        &self,
        body: Bytes,
        provider: &str,
    ) -> Result<(Bytes, Option<Usage>), ApiError> {
        let text = std::str::from_utf8(&body).map_err(|_| bad_answer(provider))?;
        if !text.trim_start().starts_with('{') {
            return Err(bad_answer(provider));
        }
        let probe: ResponseProbe<'_> =
            serde_json::from_str(text).map_err(|_| bad_answer(provider))?;
        let usage = probe.usage();
        let tagged = self.tag(&body, &probe, &mut None);
        Ok((tagged.map_or(body, Bytes::from), usage))
    }

    /// `json` with the probed object's string ids tagged; `None` when it has none. `last`
    /// remembers the last (upstream id, tagged id) of the response itself: a stream repeats it in
    /// every lifecycle event.
    fn tag(
        &self,
        json: &[u8],
        probe: &ResponseProbe<'_>,
        last: &mut Option<(String, String)>,
    ) -> Option<Vec<u8>> {
        // Tagged ids are `resp_` + base64url: JSON strings without escapes, quoted as they are.
        let mut values: [(Option<&RawValue>, String); 2] = Default::default();
        for (i, (slot, raw)) in values
            .iter_mut()
            .zip([probe.id, probe.previous_response_id])
            .enumerate()
        {
            let Some(raw) = raw else { continue };
            let Some(upstream) = raw_string(raw) else {
                continue;
            };
            let tagged = match last {
                Some((id, tagged)) if i == 0 && *id == upstream => tagged.clone(),
                _ if i == 0 => {
                    let tagged = tag_id(&self.connection_id, &upstream);
                    *last = Some((upstream.into_owned(), tagged.clone()));
                    tagged
                }
                _ => tag_id(&self.connection_id, &upstream),
            };
            *slot = (Some(raw), tagged);
        }
        let base = json.as_ptr() as usize;
        let mut spans: [(usize, usize, &str); 2] = [(0, 0, ""); 2];
        let mut count = 0;
        for (raw, tagged) in &values {
            let Some(raw) = raw else { continue };
            let start = (raw.get().as_ptr() as usize).checked_sub(base)?;
            spans[count] = (start, start.checked_add(raw.get().len())?, tagged.as_str());
            count += 1;
        }
        let spans = &mut spans[..count];
        if spans.is_empty() {
            return None;
        }
        spans.sort_unstable_by_key(|(start, _, _)| *start);
        let mut out = Vec::with_capacity(json.len() + 2 * (spans[0].2.len() + 2));
        let mut at = 0;
        for (start, end, tagged) in spans.iter() {
            out.extend_from_slice(json.get(at..*start)?);
            out.push(b'"');
            out.extend_from_slice(tagged.as_bytes());
            out.push(b'"');
            at = *end;
        }
        out.extend_from_slice(json.get(at..)?);
        Some(out)
    }

    /// The relay of a streamed answer.
    pub fn relay(&self, provider: &'static str, max_event_bytes: usize) -> ResponsesRelay {
        ResponsesRelay {
            provider,
            answer: ResponsesAnswer {
                connection_id: self.connection_id.clone(),
            },
            splitter: EventSplitter::new(max_event_bytes),
            usage: None,
            completed: false,
            relayed: 0,
            last_tag: None,
        }
    }
}

/// The lifecycle events whose `response` member is the response object, and whether each ends
/// the stream.
fn lifecycle(name: &[u8]) -> Option<bool> {
    match name {
        b"response.created" | b"response.in_progress" | b"response.queued" => Some(false),
        b"response.completed" | b"response.incomplete" | b"response.failed" => Some(true),
        _ => None,
    }
}

/// The name on an SSE event's `event:` line, if it has one (OpenAI and Azure put it first).
fn event_name(event: &[u8]) -> Option<&[u8]> {
    lines(event)
        .find_map(|line| line.strip_prefix(b"event:"))
        .map(<[u8]>::trim_ascii)
}

/// The lines of an event, found with `memchr` (a lifecycle event is one long `data:` line).
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(event);
    std::iter::from_fn(move || {
        let text = rest?;
        match memchr::memchr(b'\n', text) {
            Some(end) => {
                rest = Some(&text[end + 1..]);
                Some(&text[..end])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

#[derive(Deserialize)]
struct TypeProbe {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Relays a Responses stream: events pass byte for byte, except the lifecycle events, whose
/// response id is tagged and whose usage is read. Events are told apart by their `event:` line
/// (OpenAI and Azure send one), so the content deltas — most of a stream — are not parsed; an
/// event without that line is probed for its `type`. Ends at `response.completed`,
/// `response.incomplete`, `response.failed` or an `error` event.
#[derive(Debug)]
pub struct ResponsesRelay {
    provider: &'static str,
    answer: ResponsesAnswer,
    splitter: EventSplitter,
    usage: Option<Usage>,
    completed: bool,
    /// Events passed on: the next `sequence_number` of an OpenAI stream (numbered from 0), for
    /// the gateway's own error event.
    relayed: u64,
    /// The last id tagged (every lifecycle event repeats it).
    last_tag: Option<(String, String)>,
}

impl ResponsesRelay {
    fn relay_event(&mut self, event: &Bytes, out: &mut BytesMut) -> Result<(), ApiError> {
        self.relayed += 1;
        let probed;
        let name: Option<&[u8]> = match event_name(event) {
            Some(name) => Some(name),
            None => {
                probed = data_of(event)
                    .and_then(|data| serde_json::from_str::<TypeProbe>(&data).ok())
                    .and_then(|p| p.kind);
                probed.as_deref().map(str::as_bytes)
            }
        };
        let Some(name) = name else {
            // Comments and keep-alives.
            pass(event, out);
            return Ok(());
        };
        if name == b"error" {
            self.completed = true;
            pass(event, out);
            return Ok(());
        }
        let Some(ends) = lifecycle(name) else {
            pass(event, out);
            return Ok(());
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let unreadable = || {
            ApiError::upstream_bad_answer(
                self.provider,
                format!("a {name} event whose response object is not readable"),
            )
        };
        // One `data:` line, as OpenAI and Azure send: read in place; else joined.
        let joined;
        let data: &[u8] = match single_data_line(event) {
            Some(data) => data,
            None => {
                joined = data_of(event).ok_or_else(unreadable)?;
                joined.as_bytes()
            }
        };
        let probe: LifecycleProbe<'_> = serde_json::from_slice(data).map_err(|_| unreadable())?;
        if let Some(usage) = probe.response.usage() {
            self.usage = Some(usage);
        }
        let tagged = self.answer.tag(data, &probe.response, &mut self.last_tag);
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(tagged.as_deref().unwrap_or(data));
        out.extend_from_slice(b"\n\n");
        if ends {
            self.completed = true;
        }
        Ok(())
    }
}

/// The payload of an event with exactly one `data:` line, borrowed.
fn single_data_line(event: &[u8]) -> Option<&[u8]> {
    let mut found = None;
    for line in lines(event) {
        if let Some(rest) = line.strip_prefix(b"data:") {
            if found.is_some() {
                return None;
            }
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            found = Some(rest.strip_suffix(b"\r").unwrap_or(rest));
        }
    }
    found
}

fn pass(event: &[u8], out: &mut BytesMut) {
    out.extend_from_slice(event);
    out.extend_from_slice(b"\n\n");
}

impl StreamTranslator for ResponsesRelay {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) -> Result<(), ApiError> {
        self.splitter.push(chunk);
        while !self.completed
            && let Some(event) = self.splitter.next_event()
        {
            self.relay_event(&event, out)?;
        }
        if !self.completed && self.splitter.overflowed() {
            return Err(event_too_large(
                self.provider,
                self.splitter.max_event_bytes(),
            ));
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut BytesMut) -> Result<(), ApiError> {
        if !self.completed
            && let Some(rest) = self.splitter.finish()
        {
            self.relay_event(&rest, out)?;
        }
        if !self.completed {
            return Err(stream_truncated(self.provider, "response.completed"));
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.completed
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The Responses API's `error` event (the stream's response was never completed).
    fn write_error(&mut self, error: &ApiError, out: &mut BytesMut) {
        write_error_event(error, self.relayed, out);
    }
}

/// An `error` event of the Responses API stream.
pub fn write_error_event(error: &ApiError, sequence_number: u64, out: &mut BytesMut) {
    let event = serde_json::json!({
        "type": "error",
        "code": error.code.as_deref().unwrap_or(error.kind),
        "message": error.message,
        "param": error.param,
        "sequence_number": sequence_number,
    });
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&serde_json::to_vec(&event).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
}

/// Builds the passthrough call of a Responses client to an `openai` or `azure` target.
pub fn build(ctx: &super::super::CallContext<'_>) -> Result<super::super::Outbound, ApiError> {
    let connection = ctx.target.connection;
    let model = &ctx.target.model;
    let model_in_body = match connection.provider {
        Provider::Azure => model.deployment.as_deref().unwrap_or(&model.remote),
        _ => model.remote.as_str(),
    };
    let (url, headers) = match connection.provider {
        // Both depend on the connection alone: made once per connection, as for chat (a URL
        // parse per call cost ~8% of a request).
        Provider::OpenAi => (
            super::super::UpstreamUrl::cached(connection, Operation::Responses, || {
                super::url(&connection.endpoint, Operation::Responses.path())
            }),
            super::credential_header(connection)?.into_iter().collect(),
        ),
        _ => {
            let endpoint = endpoint(connection)?;
            (
                endpoint.url("", None).into(),
                endpoint.auth.into_iter().collect(),
            )
        }
    };
    Ok(super::super::Outbound {
        url,
        headers,
        body: passthrough_body(ctx.body, ctx.request, connection, model_in_body)?,
        wire: super::super::WireFormat::Responses(ResponsesAnswer {
            connection_id: connection.id.clone(),
        }),
    })
}

/// Where a connection's Responses endpoint is, and how it authenticates.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL of `responses` (append `/{id}` and `/{id}/input_items`) without query.
    pub base: String,
    /// The query every call carries (Azure's dated `api-version`), if any.
    pub query: Option<String>,
    pub auth: Option<(HeaderName, HeaderValue)>,
}

impl Endpoint {
    /// The URL of `suffix` below `responses` (`""`, `/{id}`, `/{id}/input_items`), with the
    /// endpoint's query and the client's (already checked) query joined.
    pub fn url(&self, suffix: &str, client_query: Option<&str>) -> String {
        let mut url = format!("{}{suffix}", self.base);
        let queries = [self.query.as_deref(), client_query];
        let mut first = true;
        for query in queries.into_iter().flatten().filter(|q| !q.is_empty()) {
            url.push(if first { '?' } else { '&' });
            url.push_str(query);
            first = false;
        }
        url
    }
}

/// The Responses endpoint of an `openai` or `azure` connection.
pub fn endpoint(connection: &ConnectionEntry) -> Result<Endpoint, ApiError> {
    use secrecy::ExposeSecret as _;
    match connection.provider {
        Provider::OpenAi => Ok(Endpoint {
            base: super::url(&connection.endpoint, "responses"),
            query: None,
            auth: super::bearer(connection.credential.expose_secret())?,
        }),
        Provider::Azure => super::super::azure::responses_endpoint(connection),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("stored responses are not available through {other} connections"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_other_ids_are_not_tags() {
        let id = tag_id(
            "conn-abcdefghijklmnopqrst",
            "resp_68af4030592c81938ec0a5fbab4a3e9f",
        );
        assert!(id.starts_with("resp_") && !id.contains('\n'), "{id}");
        assert_eq!(
            untag_id(&id),
            Some(TaggedId {
                connection_id: "conn-abcdefghijklmnopqrst".into(),
                upstream_id: "resp_68af4030592c81938ec0a5fbab4a3e9f".into()
            })
        );
        for other in [
            "resp_68af4030592c81938ec0a5fbab4a3e9f",
            "msg_1",
            "resp_",
            "resp_!!",
            &tag_id("conn-1", "resp/../x"),
            &tag_id("", "resp_1"),
        ] {
            assert_eq!(untag_id(other), None, "{other}");
        }
    }

    fn relay_all(
        relay: &mut ResponsesRelay,
        input: &[u8],
        piece: usize,
    ) -> (String, Result<(), ApiError>) {
        let mut out = BytesMut::new();
        for chunk in input.chunks(piece) {
            if let Err(e) = relay.push(chunk, &mut out) {
                return (String::from_utf8(out.to_vec()).unwrap(), Err(e));
            }
        }
        let end = relay.finish(&mut out);
        (String::from_utf8(out.to_vec()).unwrap(), end)
    }

    const STREAM: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"previous_response_id\":null,\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"resp_up1 Hi\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"completed\",\"previous_response_id\":\"resp_up0\",\"output\":[],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":5},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48}}}\n\n",
    );

    #[test]
    fn the_relay_tags_lifecycle_ids_reads_usage_and_passes_the_rest_byte_for_byte() {
        let answer = ResponsesAnswer {
            connection_id: "conn-a".into(),
        };
        for piece in [1, 7, 13, STREAM.len()] {
            let mut relay = answer.relay("openai", 1 << 20);
            let (out, end) = relay_all(&mut relay, STREAM.as_bytes(), piece);
            end.unwrap();
            let tagged = tag_id("conn-a", "resp_up1");
            let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
            assert_eq!(events.len(), 3);
            assert_eq!(
                events[0],
                format!(
                    "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"{tagged}\",\"object\":\"response\",\"status\":\"in_progress\",\"previous_response_id\":null,\"output\":[],\"usage\":null}}}}"
                )
            );
            // Content is not touched, even text that looks like the id.
            assert_eq!(events[1], STREAM.split("\n\n").nth(1).unwrap());
            assert!(events[2].contains(&format!("\"id\":\"{tagged}\"")));
            assert!(events[2].contains(&format!(
                "\"previous_response_id\":\"{}\"",
                tag_id("conn-a", "resp_up0")
            )));
            assert!(relay.complete());
            assert_eq!(
                relay.usage(),
                Some(Usage {
                    prompt_tokens: 37,
                    completion_tokens: 11,
                    total_tokens: 48,
                    cache_read_tokens: 5,
                    cache_write_tokens: 0,
                    reasoning_tokens: 4,
                })
            );
        }
    }

    #[test]
    fn a_stream_without_its_terminal_event_is_an_error_and_the_error_event_is_numbered() {
        let answer = ResponsesAnswer {
            connection_id: "conn-a".into(),
        };
        let cut = STREAM.rsplit_once("event: response.completed").unwrap().0;
        let mut relay = answer.relay("azure", 1 << 20);
        let (_, end) = relay_all(&mut relay, cut.as_bytes(), 5);
        let err = end.unwrap_err();
        assert!(
            err.message.contains("response.completed"),
            "{}",
            err.message
        );
        let mut out = BytesMut::new();
        relay.write_error(&err, &mut out);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let data: serde_json::Value =
            serde_json::from_str(text.strip_prefix("event: error\ndata: ").unwrap().trim())
                .unwrap();
        assert_eq!(data["type"], "error");
        assert_eq!(data["sequence_number"], 2);
        assert_eq!(data["code"], "upstream_invalid_response");
        // An unreadable lifecycle event is refused, not passed on.
        let mut relay = answer.relay("openai", 1 << 20);
        let (_, end) = relay_all(
            &mut relay,
            b"event: response.created\ndata: {\"response\":7}\n\n",
            64,
        );
        assert!(end.is_err());
        // Events larger than the limit end the stream.
        let mut relay = answer.relay("openai", 64);
        let (_, end) = relay_all(&mut relay, STREAM.as_bytes(), 16);
        assert!(
            end.unwrap_err()
                .message
                .contains("--max-stream-event-bytes")
        );
    }

    #[test]
    fn answers_get_tagged_ids_and_usage() {
        let answer = ResponsesAnswer {
            connection_id: "conn-b".into(),
        };
        let body = Bytes::from_static(
            br#"{"id":"resp_x", "object":"response","previous_response_id":null,"output":[{"id":"msg_1"}],"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#,
        );
        let (out, usage) = answer.translate(body, "openai").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            format!(
                r#"{{"id":"{}", "object":"response","previous_response_id":null,"output":[{{"id":"msg_1"}}],"usage":{{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}}"#,
                tag_id("conn-b", "resp_x")
            )
        );
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7,
                ..Usage::default()
            })
        );
        // A reasoning model's answer with a cache hit (wire formats: Responses usage).
        let (_, usage) = answer
            .translate(
                Bytes::from_static(
                    br#"{"id":"resp_y","object":"response","usage":{"input_tokens":1061,"input_tokens_details":{"cached_tokens":1024},"output_tokens":75,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":1136}}"#,
                ),
                "azure",
            )
            .unwrap();
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 1061,
                completion_tokens: 75,
                total_tokens: 1136,
                cache_read_tokens: 1024,
                cache_write_tokens: 0,
                reasoning_tokens: 64,
            })
        );
        // A delete confirmation: the id is tagged, no usage.
        let (out, usage) = answer
            .translate(
                Bytes::from_static(br#"{"id":"resp_x","object":"response","deleted":true}"#),
                "azure",
            )
            .unwrap();
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .contains(&tag_id("conn-b", "resp_x"))
        );
        assert!(usage.is_none());
        for bad in [&b"[1]"[..], b"not json", b"{\"id\":"] {
            assert!(answer.translate(Bytes::from_static(bad), "openai").is_err());
        }
    }

    #[test]
    fn endpoint_urls_join_queries() {
        let endpoint = Endpoint {
            base: "https://r.openai.azure.com/openai/responses".into(),
            query: Some("api-version=2025-04-01-preview".into()),
            auth: None,
        };
        assert_eq!(
            endpoint.url("/resp_1/input_items", Some("limit=5")),
            "https://r.openai.azure.com/openai/responses/resp_1/input_items?api-version=2025-04-01-preview&limit=5"
        );
        let endpoint = Endpoint {
            base: "https://api.openai.com/v1/responses".into(),
            query: None,
            auth: None,
        };
        assert_eq!(
            endpoint.url("", None),
            "https://api.openai.com/v1/responses"
        );
        assert_eq!(
            endpoint.url("/resp_1", Some("include[]=x")),
            "https://api.openai.com/v1/responses/resp_1?include[]=x"
        );
    }
}
