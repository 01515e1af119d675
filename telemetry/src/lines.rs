//! Lines a binary writes on stderr outside the log filter: the addresses it listens on (test
//! harnesses and scripts wait for that line), a few one-off notices, the error it ends with, and
//! panics. Plain text by default; with `LLM_PROXY_LOG_FORMAT=json` each is one JSON object shaped
//! like the log lines (`timestamp`, `level`, `fields` with `message` and the other fields,
//! `target`), so that every line a binary writes is JSON (DESIGN §16).
//!
//! They bypass `RUST_LOG` as the plain lines always did (`RUST_LOG=warn` must not hide the
//! listening line), and read the format from the environment themselves: the error of a failed
//! start is printed before any subscriber exists.

use crate::LogFormat;
use std::fmt::Write as _;
use std::io::Write as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};

/// Prints `message` as is, or as a JSON line at level INFO carrying `fields` too.
pub fn notice(target: &str, message: &str, fields: &[(&str, &str)]) {
    let line = match LogFormat::from_env() {
        LogFormat::Human => message.to_owned(),
        LogFormat::Json => json_line("INFO", target, message, fields),
    };
    print_line(&line);
}

/// Prints the error a binary ends with: `error: MESSAGE`, or a JSON line at level ERROR.
pub fn fatal(target: &str, message: &str) {
    let line = match LogFormat::from_env() {
        LogFormat::Human => format!("error: {message}"),
        LogFormat::Json => json_line("ERROR", target, message, &[]),
    };
    print_line(&line);
}

/// One write of the whole line (no interleaving with the log lines); a closed stderr is no
/// reason to stop serving, so a failed write is ignored (`eprintln!` would panic).
fn print_line(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `{"timestamp":..,"level":..,"fields":{"message":..,..},"target":..}`, as tracing-subscriber's
/// JSON format writes an event outside any span.
pub(crate) fn json_line(
    level: &str,
    target: &str,
    message: &str,
    fields: &[(&str, &str)],
) -> String {
    let mut timestamp = String::new();
    // tracing-subscriber's own clock and format, so that these lines read like the others.
    let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
    let mut line = format!(
        "{{\"timestamp\":{},\"level\":{},\"fields\":{{\"message\":{}",
        quoted(&timestamp),
        quoted(level),
        quoted(message)
    );
    for (name, value) in fields {
        let _ = write!(line, ",{}:{}", quoted(name), quoted(value));
    }
    let _ = write!(line, "}},\"target\":{}}}", quoted(target));
    line
}

fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// A panic becomes one JSON line (message, location, thread, and the backtrace when
/// `RUST_BACKTRACE` asks for one) instead of the default hook's plain lines.
pub(crate) fn install_json_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "Box<dyn Any>".to_owned());
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("<unnamed>")
            .to_owned();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        let mut fields = vec![("location", location.as_str()), ("thread", thread.as_str())];
        if let Some(backtrace) = &backtrace {
            fields.push(("backtrace", backtrace.as_str()));
        }
        print_line(&json_line(
            "ERROR",
            "panic",
            &format!("panicked: {message}"),
            &fields,
        ));
    }));
}

#[cfg(test)]
mod tests {
    use super::json_line;
    use serde_json::Value;

    #[test]
    fn json_lines_have_the_shape_of_the_log_lines_and_escape_their_text() {
        let line = json_line(
            "INFO",
            "llm_proxy_data_plane",
            "listening on \"127.0.0.1:1\"\nnext",
            &[("addr", "127.0.0.1:1"), ("metrics_addr", "-")],
        );
        assert_eq!(line.lines().count(), 1, "{line}");
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["target"], "llm_proxy_data_plane");
        assert_eq!(
            value["fields"]["message"],
            "listening on \"127.0.0.1:1\"\nnext"
        );
        assert_eq!(value["fields"]["addr"], "127.0.0.1:1");
        assert_eq!(value["fields"]["metrics_addr"], "-");
        // RFC 3339 in UTC, as tracing-subscriber writes it: 2026-01-02T03:04:05.678901Z.
        let timestamp = value["timestamp"].as_str().unwrap();
        assert!(
            timestamp.len() > 20 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T',
            "{timestamp}"
        );
        assert_eq!(value.as_object().unwrap().len(), 4, "{line}");
    }
}
