//! The inbound JSON body, parsed once and only one level deep.
//!
//! Top-level values stay raw JSON slices of the original bytes (`RawValue`), so fields the gateway
//! does not change go upstream byte for byte; only `model` (and for streams `stream_options`) are
//! replaced when the body is written back.

use crate::errors::ApiError;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::fmt;

/// A JSON object as an ordered list of (key, raw value).
#[derive(Debug)]
pub struct RawObject<'a> {
    fields: Vec<(String, &'a RawValue)>,
}

/// Up to this many members, duplicates are found by comparing with each earlier key (no
/// allocation: the common request); past it, through a hash set (linear in the member count).
const LINEAR_DUPLICATE_SCAN: usize = 16;

/// Reads a JSON object into a [`RawObject`], refusing duplicate keys and more than `max_keys`
/// members. Time and memory are linear in the input (DESIGN §19).
struct ObjectSeed<'c> {
    max_keys: usize,
    /// Set when the object had more than `max_keys` members (serde errors carry no type).
    too_many: &'c std::cell::Cell<bool>,
}

impl<'de> de::DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = RawObject<'de>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = RawObject<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut fields: Vec<(String, &'de RawValue)> =
            Vec::with_capacity(map.size_hint().unwrap_or(12).min(LINEAR_DUPLICATE_SCAN));
        let mut seen: Option<HashSet<String>> = None;
        while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
            if fields.len() == self.max_keys {
                self.too_many.set(true);
                return Err(de::Error::custom(format_args!(
                    "more than {} members",
                    self.max_keys
                )));
            }
            // Upstreams disagree on which duplicate wins; refuse rather than guess.
            let duplicate = match &mut seen {
                Some(seen) => !seen.insert(key.clone()),
                None if fields.len() < LINEAR_DUPLICATE_SCAN => {
                    fields.iter().any(|(k, _)| *k == key)
                }
                None => {
                    let mut set: HashSet<String> = HashSet::with_capacity(fields.len() * 2);
                    set.extend(fields.iter().map(|(k, _)| k.clone()));
                    let duplicate = !set.insert(key.clone());
                    seen = Some(set);
                    duplicate
                }
            };
            if duplicate {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            fields.push((key, value));
        }
        Ok(RawObject { fields })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    /// Any number of members (a nested object is bounded by the body it is part of).
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let too_many = std::cell::Cell::new(false);
        de::DeserializeSeed::deserialize(
            ObjectSeed {
                max_keys: usize::MAX,
                too_many: &too_many,
            },
            deserializer,
        )
    }
}

impl<'a> RawObject<'a> {
    /// The member names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(k, _)| k.as_str())
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Serialises the object with `overrides` (key, raw JSON) replacing or adding fields and
    /// `removals` dropped; every other value is copied verbatim.
    pub fn write(&self, overrides: &[(&str, &str)], removals: &[&str]) -> Vec<u8> {
        let size: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + overrides
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
            + 2;
        let mut out = Vec::with_capacity(size);
        out.push(b'{');
        let mut first = true;
        let mut push = |out: &mut Vec<u8>, key: &str, raw: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, key);
            out.push(b':');
            out.extend_from_slice(raw.as_bytes());
        };
        for (key, value) in &self.fields {
            if removals.contains(&key.as_str()) {
                continue;
            }
            match overrides.iter().find(|(k, _)| k == key) {
                Some((_, raw)) => push(&mut out, key, raw),
                None => push(&mut out, key, value.get()),
            }
        }
        for (key, raw) in overrides {
            if self.get(key).is_none() {
                push(&mut out, key, raw);
            }
        }
        out.push(b'}');
        out
    }
}

/// What the gateway needs to know about a chat or embeddings request.
#[derive(Debug)]
pub struct ParsedRequest<'a> {
    pub object: RawObject<'a>,
    pub model: Option<String>,
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens` (Responses API).
    pub max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn field<'a, T: Deserialize<'a>>(
    object: &RawObject<'a>,
    key: &str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    match object.get(key) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str::<T>(raw.get()).map(Some).map_err(|_| {
            ApiError::invalid_request(format!("`{key}` must be {expected}")).with_param(key)
        }),
    }
}

/// Parses the body: a JSON object of at most `max_top_level_keys` members
/// (`--max-top-level-keys`), with a string `model` when `model_required`.
pub fn parse(
    body: &[u8],
    model_required: bool,
    max_top_level_keys: usize,
) -> Result<ParsedRequest<'_>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid_request("request body is not valid UTF-8"))?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid_request(
            "request body is empty; expected a JSON object",
        ));
    }
    let object = parse_top_level(text, max_top_level_keys)?;
    let model: Option<String> = field(&object, "model", "a string")?;
    if model_required && model.as_deref().is_none_or(str::is_empty) {
        return Err(
            ApiError::invalid_request("you must provide a model parameter").with_param("model"),
        );
    }
    let stream = field::<bool>(&object, "stream", "a boolean")?.unwrap_or(false);
    let include_usage = field::<StreamOptions>(&object, "stream_options", "an object")?
        .is_some_and(|o| o.include_usage);
    let max_output_tokens =
        match field::<u64>(&object, "max_completion_tokens", "a positive integer")? {
            Some(n) => Some(n),
            None => match field::<u64>(&object, "max_tokens", "a positive integer")? {
                Some(n) => Some(n),
                None => field::<u64>(&object, "max_output_tokens", "a positive integer")?,
            },
        };
    Ok(ParsedRequest {
        object,
        model,
        stream,
        include_usage,
        max_output_tokens,
    })
}

fn parse_top_level(text: &str, max_keys: usize) -> Result<RawObject<'_>, ApiError> {
    let too_many = std::cell::Cell::new(false);
    let seed = ObjectSeed {
        max_keys,
        too_many: &too_many,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let object = de::DeserializeSeed::deserialize(seed, &mut deserializer)
        .and_then(|object| deserializer.end().map(|()| object));
    object.map_err(|e| {
        if too_many.get() {
            ApiError::invalid_request(format!(
                "request body has more than {max_keys} top-level members, the gateway's limit (--max-top-level-keys)"
            ))
        } else {
            ApiError::invalid_request(format!("request body is not a valid JSON object: {e}"))
        }
    })
}

/// Where the member `key` of `object` lies in `body` (the text `object` was parsed from): the
/// byte range from its key's opening quote to the end of its value. `None` when `object` has no
/// such member or was not parsed from `body`.
fn member_span(body: &[u8], object: &RawObject<'_>, key: &str) -> Option<(usize, usize)> {
    let value = object.get(key)?.get();
    let base = body.as_ptr() as usize;
    let start = (value.as_ptr() as usize).checked_sub(base)?;
    let end = start.checked_add(value.len())?;
    if end > body.len() {
        return None;
    }
    // Back over `"key" :` — the body is valid JSON, so the bytes before a member's value are
    // whitespace, a colon, whitespace and the key's closing quote.
    let mut i = start;
    let skip_space = |i: &mut usize| {
        while *i > 0 && body[*i - 1].is_ascii_whitespace() {
            *i -= 1;
        }
    };
    skip_space(&mut i);
    if i == 0 || body[i - 1] != b':' {
        return None;
    }
    i -= 1;
    skip_space(&mut i);
    if i == 0 || body[i - 1] != b'"' {
        return None;
    }
    i -= 1;
    // The opening quote: the previous `"` preceded by an even number of backslashes.
    loop {
        let quote = body[..i].iter().rposition(|b| *b == b'"')?;
        let backslashes = body[..quote]
            .iter()
            .rev()
            .take_while(|b| **b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some((quote, end));
        }
        i = quote;
    }
}

/// `body` with the member `key` of its top-level `object` replaced by `member` (raw JSON members
/// such as `"model":"x"`), every other byte kept. `None` when `object` has no member `key`.
pub fn replace_member(
    body: &[u8],
    object: &RawObject<'_>,
    key: &str,
    member: &str,
) -> Option<Vec<u8>> {
    let (start, end) = member_span(body, object, key)?;
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// `body` with several members of `object` (top-level, or an object nested in `body`) replaced
/// by the raw members given with their keys, every other byte kept; keys `object` lacks are
/// skipped. `None` when a member cannot be located in `body`.
pub fn replace_members(
    body: &[u8],
    object: &RawObject<'_>,
    members: &[(&str, &str)],
) -> Option<Vec<u8>> {
    let mut spans = Vec::with_capacity(members.len());
    for (key, member) in members {
        if object.get(key).is_some() {
            let (start, end) = member_span(body, object, key)?;
            spans.push((start, end, *member));
        }
    }
    spans.sort_unstable_by_key(|(start, _, _)| *start);
    let added: usize = spans.iter().map(|(_, _, m)| m.len()).sum();
    let mut out = Vec::with_capacity(body.len() + added);
    let mut at = 0;
    for (start, end, member) in spans {
        out.extend_from_slice(body.get(at..start)?);
        out.extend_from_slice(member.as_bytes());
        at = end;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(out)
}

/// `body` without the member `key` of its top-level `object` (and the comma that separated it),
/// every other byte kept. `None` when `object` has no member `key`.
pub fn remove_member(body: &[u8], object: &RawObject<'_>, key: &str) -> Option<Vec<u8>> {
    let (mut start, mut end) = member_span(body, object, key)?;
    let after = body[end..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|n| end + n);
    match after {
        // A member follows: drop up to it, comma included.
        Some(comma) if body[comma] == b',' => end = comma + 1,
        // The last member: drop the comma before it, if any.
        _ => {
            let before = body[..start].iter().rposition(|b| !b.is_ascii_whitespace());
            if let Some(comma) = before.filter(|i| body[*i] == b',') {
                start = comma;
            }
        }
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// Parses a raw JSON object (e.g. a nested value); `None` when it is not an object.
pub fn parse_object(raw: &str) -> Option<RawObject<'_>> {
    serde_json::from_str(raw).ok()
}

/// A JSON string literal for `value`.
pub fn json_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `--max-top-level-keys`.
    const KEYS: usize = 1000;

    #[test]
    fn model_is_replaced_and_everything_else_is_byte_identical() {
        let body = br#"{"model":"gpt-4","messages":[{"role":"user","content":"h\u00e9 \"x\""}],"temperature":0.70,"n":1}"#;
        let parsed = parse(body, true, KEYS).unwrap();
        assert_eq!(parsed.model.as_deref(), Some("gpt-4"));
        let out = parsed
            .object
            .write(&[("model", &json_string("gpt-4-0613"))], &[]);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"gpt-4-0613","messages":[{"role":"user","content":"h\u00e9 \"x\""}],"temperature":0.70,"n":1}"#
        );
    }

    #[test]
    fn members_are_replaced_and_removed_in_place() {
        let body = br#"{ "model" : "claude" ,"messages":[{"role":"user","content":"model"}], "stream":true }"#;
        let parsed = parse(body, true, KEYS).unwrap();
        let out = replace_member(body, &parsed.object, "model", r#""model":"claude-x""#).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "model":"claude-x" ,"messages":[{"role":"user","content":"model"}], "stream":true }"#
        );
        let out = remove_member(body, &parsed.object, "model").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "messages":[{"role":"user","content":"model"}], "stream":true }"#
        );
        let out = remove_member(body, &parsed.object, "stream").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "model" : "claude" ,"messages":[{"role":"user","content":"model"}] }"#
        );
        assert!(remove_member(body, &parsed.object, "absent").is_none());
        // Escaped keys: the span starts at the key's real opening quote.
        let body = br#"{"a\"b":1,"mo\u0064el":"m"}"#;
        let parsed = parse(body, false, KEYS).unwrap();
        let out = replace_member(body, &parsed.object, "model", r#""model":"n""#).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a\"b":1,"model":"n"}"#
        );
        let out = remove_member(body, &parsed.object, "a\"b").unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"mo\u0064el":"m"}"#);
        // Only one member: the object becomes empty.
        let body = br#"{"model":"m"}"#;
        let parsed = parse(body, true, KEYS).unwrap();
        assert_eq!(remove_member(body, &parsed.object, "model").unwrap(), b"{}");
    }

    #[test]
    fn several_members_are_replaced_in_one_pass_also_in_nested_objects() {
        let body = br#"{"type":"response.created","response":{"id":"resp_1", "model":"m","previous_response_id":"resp_0"},"id":"top"}"#;
        let parsed = parse(body, false, KEYS).unwrap();
        let nested = parse_object(parsed.object.get("response").unwrap().get()).unwrap();
        // Listed out of order, one key absent: still one splice each, in body order.
        let out = replace_members(
            body,
            &nested,
            &[
                ("previous_response_id", r#""previous_response_id":"P""#),
                ("absent", r#""absent":1"#),
                ("id", r#""id":"I""#),
            ],
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"type":"response.created","response":{"id":"I", "model":"m","previous_response_id":"P"},"id":"top"}"#
        );
        assert_eq!(replace_members(body, &nested, &[]).unwrap(), body);
    }

    #[test]
    fn overrides_add_missing_fields_and_removals_drop() {
        let parsed = parse(br#"{"model":"m","stream":true,"user":"u"}"#, true, KEYS).unwrap();
        assert!(parsed.stream && !parsed.include_usage);
        let out = parsed.object.write(
            &[("stream_options", r#"{"include_usage":true}"#)],
            &["user"],
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn reads_stream_usage_and_token_caps() {
        let p = parse(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":50}"#,
            true,
            KEYS,
        )
        .unwrap();
        assert!(p.stream && p.include_usage);
        assert_eq!(p.max_output_tokens, Some(50));
        let p = parse(
            br#"{"model":"m","max_tokens":50,"max_completion_tokens":70}"#,
            true,
            KEYS,
        )
        .unwrap();
        assert_eq!(p.max_output_tokens, Some(70));
    }

    #[test]
    fn malformed_bodies_get_specific_errors() {
        for (body, needle) in [
            (&b""[..], "empty"),
            (b"{", "not a valid JSON object"),
            (b"[1,2]", "not a valid JSON object"),
            (b"{\"messages\":[]}", "model"),
            (b"{\"model\":5}", "`model` must be a string"),
            (
                b"{\"model\":\"m\",\"stream\":\"yes\"}",
                "`stream` must be a boolean",
            ),
            (b"{\"model\":\"m\",\"max_tokens\":-1}", "max_tokens"),
            (b"\xff\xfe", "UTF-8"),
            (
                b"{\"model\":\"m\",\"stream\":false,\"stream\":true}",
                "duplicate key `stream`",
            ),
        ] {
            let err = parse(body, true, KEYS).unwrap_err();
            assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
            assert!(err.message.contains(needle), "{:?}: {}", body, err.message);
        }
    }

    /// `{"model":"m","k0":0,"k1":1,...}` with `n` distinct extra keys, `duplicate` appended last.
    fn many_keys(n: usize, duplicate: Option<&str>) -> Vec<u8> {
        let mut body = String::from(r#"{"model":"m""#);
        for i in 0..n {
            body.push_str(&format!(r#","k{i}":{i}"#));
        }
        if let Some(key) = duplicate {
            body.push_str(&format!(r#","{key}":true"#));
        }
        body.push('}');
        body.into_bytes()
    }

    /// Generous bounds that guard against a CPU denial of service: the old quadratic check took
    /// ~10 s for 80k keys in a release build (far more in a debug one). Refusing at the key limit
    /// takes milliseconds; parsing all 80k keys linearly under a second even in a debug build.
    const WELL_UNDER_A_SECOND: std::time::Duration = std::time::Duration::from_secs(1);
    const LINEAR_EVEN_IN_DEBUG: std::time::Duration = std::time::Duration::from_secs(5);

    #[test]
    fn eighty_thousand_keys_are_refused_fast_naming_the_flag() {
        let body = many_keys(80_000, None);
        let started = std::time::Instant::now();
        let err = parse(&body, true, KEYS).unwrap_err();
        assert!(
            started.elapsed() < WELL_UNDER_A_SECOND,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
        assert!(
            err.message.contains("more than 1000 top-level members"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("--max-top-level-keys"),
            "{}",
            err.message
        );
        // The limit itself is allowed: 999 extra keys and `model`.
        assert!(parse(&many_keys(KEYS - 1, None), true, KEYS).is_ok());
        assert!(parse(&many_keys(KEYS, None), true, KEYS).is_err());
    }

    #[test]
    fn the_duplicate_check_is_linear_without_a_key_limit() {
        let body = many_keys(80_000, None);
        let started = std::time::Instant::now();
        let parsed = parse(&body, true, usize::MAX).unwrap();
        assert!(
            started.elapsed() < LINEAR_EVEN_IN_DEBUG,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(parsed.object.keys().count(), 80_001);
        let started = std::time::Instant::now();
        let nested = parse_object(std::str::from_utf8(&body).unwrap()).unwrap();
        assert!(
            started.elapsed() < LINEAR_EVEN_IN_DEBUG,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(nested.keys().count(), 80_001);
    }

    #[test]
    fn duplicates_are_refused_below_and_above_the_linear_scan() {
        for extra in [0, 3, LINEAR_DUPLICATE_SCAN - 1, LINEAR_DUPLICATE_SCAN, 500] {
            for key in ["model", "k0"] {
                if key == "k0" && extra == 0 {
                    continue;
                }
                let body = many_keys(extra, Some(key));
                let err = parse(&body, true, KEYS).unwrap_err();
                assert!(
                    err.message.contains(&format!("duplicate key `{key}`")),
                    "{extra} keys, {key}: {}",
                    err.message
                );
                let nested = std::str::from_utf8(&body).unwrap();
                assert!(parse_object(nested).is_none(), "{extra} keys, {key}");
            }
        }
        let body = many_keys(40, Some("k39"));
        assert!(
            parse(&body, true, KEYS)
                .unwrap_err()
                .message
                .contains("`k39`")
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and single-byte corruption of a valid body.
        let body = br#"{"model":"gpt-4","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"user","content":"hi"}]}"#;
        for end in 0..body.len() {
            let _ = parse(&body[..end], true, KEYS);
        }
        for i in 0..body.len() {
            for b in [b'"', b'{', b'}', b'\\', 0u8, 0xff] {
                let mut copy = body.to_vec();
                copy[i] = b;
                let _ = parse(&copy, true, KEYS);
            }
        }
    }
}
