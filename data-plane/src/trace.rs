//! W3C trace context (DESIGN §16): a `traceparent` always goes upstream — the client's trace with a
//! new parent id for the gateway's call, or a new trace when the client sent none (or a malformed
//! one). While spans are exported over OTLP, the upstream call's parent is the request's exported
//! span, so the provider's side joins the same trace under it.

use axum::http::{HeaderMap, HeaderValue};

/// The trace a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub flags: u8,
    /// The client's span (its `traceparent` parent id), when it sent one.
    pub client_span_id: Option<u64>,
    /// The gateway's span for this request when it is exported; else each upstream call gets a
    /// new random parent id.
    pub span_id: Option<u64>,
}

fn hex_u128(text: &str) -> Option<u128> {
    (text.len() == 32
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u128::from_str_radix(text, 16).ok())
    .flatten()
}

fn hex_u64(text: &str) -> Option<u64> {
    (text.len() == 16
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u64::from_str_radix(text, 16).ok())
    .flatten()
}

impl TraceContext {
    /// Parses a `traceparent` value; `None` when it is not valid per W3C Trace Context.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace_id = hex_u128(parts.next()?)?;
        let parent_id = hex_u64(parts.next()?)?;
        let flags = parts.next()?;
        let valid_version =
            version.len() == 2 && version != "ff" && version.bytes().all(|b| b.is_ascii_hexdigit());
        // Version 00 has exactly four fields; later versions may append more.
        if !valid_version || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if trace_id == 0 || parent_id == 0 || flags.len() != 2 {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            flags,
            client_span_id: Some(parent_id),
            span_id: None,
        })
    }

    /// The client's trace, or a new sampled one.
    pub fn of_request(headers: &HeaderMap) -> Self {
        const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
        headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or_else(|| Self {
                trace_id: rand::random::<u128>().max(1),
                flags: 0x01,
                client_span_id: None,
                span_id: None,
            })
    }

    /// The client's trace for the OpenTelemetry parent of the request span.
    pub fn client_parent(&self) -> Option<llm_proxy_telemetry::RemoteParent> {
        self.client_span_id
            .map(|span_id| llm_proxy_telemetry::RemoteParent {
                trace_id: self.trace_id,
                span_id,
                flags: self.flags,
            })
    }

    /// Adopts the exported request span's ids.
    pub fn with_span(self, ids: llm_proxy_telemetry::SpanIds) -> Self {
        Self {
            trace_id: ids.trace_id,
            flags: ids.flags,
            client_span_id: self.client_span_id,
            span_id: Some(ids.span_id),
        }
    }

    /// The `traceparent` for one upstream call: this trace, with the request's exported span as
    /// parent, or else a new parent id.
    pub fn upstream_header(&self) -> HeaderValue {
        let span_id = self.span_id.unwrap_or_else(|| rand::random::<u64>().max(1));
        // `00-{trace:032x}-{span:016x}-{flags:02x}`, written in place (no formatter).
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        write_hex(&mut text[3..35], self.trace_id);
        write_hex(&mut text[36..52], u128::from(span_id));
        write_hex(&mut text[53..55], u128::from(self.flags));
        // Hex digits and dashes are always a valid header value.
        HeaderValue::from_bytes(&text).unwrap_or_else(|_| {
            HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00")
        })
    }
}

/// Writes the low `out.len()` hex digits of `value` into `out`, lowercase, zero-padded (what
/// `format!("{value:0N$x}")` writes, without a formatter or an allocation).
pub(crate) fn write_hex(out: &mut [u8], value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut rest = value;
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(rest & 0xf) as usize];
        rest >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_written_like_the_formatter() {
        for value in [
            0u128,
            1,
            0xab,
            0x4bf92f3577b34da6a3ce929d0e0e4736,
            u128::MAX,
        ] {
            let mut out = [0u8; 32];
            write_hex(&mut out, value);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{value:032x}"));
        }
        let mut short = [0u8; 2];
        write_hex(&mut short, 0x1ff);
        assert_eq!(&short, b"ff");
        let t =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let header = t.upstream_header();
        let text = header.to_str().unwrap();
        assert!(
            text.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{text}"
        );
        assert!(text.ends_with("-01"), "{text}");
        assert_eq!(text.len(), 55);
    }

    #[test]
    fn parses_valid_and_refuses_malformed_traceparents() {
        let t =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.flags, 1);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future")
                .is_some()
        );
    }

    #[test]
    fn upstream_header_keeps_the_trace_and_makes_a_new_parent() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let trace = TraceContext::of_request(&headers);
        let sent = trace.upstream_header();
        let sent = sent.to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(!sent.contains("00f067aa0ba902b7"), "{sent}");
        assert!(sent.ends_with("-01"));
        assert!(TraceContext::parse(sent).is_some());
        let fresh = TraceContext::of_request(&HeaderMap::new()).upstream_header();
        assert!(TraceContext::parse(fresh.to_str().unwrap()).is_some());
    }
}
