//! Time to first byte of streamed answers, for benchmarks (`scripts/bench.sh`; oha cannot measure
//! it). Opens one keep-alive HTTP/1.1 connection and sends `--warmup` + `--requests` sequential
//! POSTs on it, timing each from just before the request is written until the first bytes of the
//! answer's body (not its headers) arrive, and until the whole answer has arrived. Every answer
//! must be a 200 `text/event-stream` that contains `--end` (default `data: [DONE]`, the end of an
//! OpenAI stream; `event: message_stop` for an Anthropic Messages stream).
//!
//! Prints one JSON object: `{"requests":N,"ttfb_ms":{"p50":..,"p90":..,"p99":..,"max":..},
//! "total_ms":{..}}`.
//!
//! Usage: `ttfb --addr 127.0.0.1:8132 --path /v1/chat/completions -H 'authorization: Bearer vk-…'
//! --body '{"model":"m","stream":true,...}' [--requests 1000] [--warmup 100] [--end 'data: [DONE]']`

use clap::Parser;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Time to first body byte of sequential streamed requests on one connection")]
struct Args {
    /// Server address (host:port).
    #[arg(long)]
    addr: String,
    /// Request path.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Extra request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// JSON request body.
    #[arg(long)]
    body: String,
    /// Measured requests.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Unmeasured requests sent first.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Text every answer's body must contain (the stream's last event).
    #[arg(long, default_value = "data: [DONE]")]
    end: String,
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    ttfb: Duration,
    total: Duration,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One connection and its receive buffer; `last_read` is when the latest bytes arrived.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    last_read: Instant,
}

impl Conn {
    fn read_more(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self
            .stream
            .read(&mut chunk)
            .map_err(|e| format!("read: {e}"))?;
        self.last_read = Instant::now();
        if n == 0 {
            return Err("connection closed by the server".to_owned());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads until `buf[from..]` contains `needle`; returns its position in `buf`.
    fn read_until(&mut self, from: usize, needle: &[u8]) -> Result<usize, String> {
        loop {
            if let Some(p) = self.buf.get(from..).and_then(|rest| find(rest, needle)) {
                return Ok(from + p);
            }
            self.read_more()?;
        }
    }

    /// Reads until `buf` holds at least `len` bytes.
    fn read_to(&mut self, len: usize) -> Result<(), String> {
        while self.buf.len() < len {
            self.read_more()?;
        }
        Ok(())
    }

    /// Sends one request and reads its whole answer.
    fn exchange(&mut self, request: &[u8], end_marker: &[u8]) -> Result<Timing, String> {
        self.buf.clear();
        let started = Instant::now();
        self.stream
            .write_all(request)
            .map_err(|e| format!("write: {e}"))?;
        let header_end = self.read_until(0, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&self.buf[..header_end]).to_ascii_lowercase();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        let mut chunked = false;
        let mut content_length = None;
        let mut event_stream = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim() {
                "transfer-encoding" => chunked = value.contains("chunked"),
                "content-length" => content_length = value.parse::<usize>().ok(),
                "content-type" => event_stream = value.starts_with("text/event-stream"),
                "connection" if value.contains("close") => {
                    return Err("the server closes the connection (no keep-alive)".to_owned());
                }
                _ => {}
            }
        }
        if !status.starts_with("http/1.1 200") {
            // Best effort: show what came with the error.
            let _ = self.read_to(header_end + content_length.unwrap_or(0));
            return Err(format!(
                "answer {}: {}",
                status.trim(),
                String::from_utf8_lossy(&self.buf[header_end..])
            ));
        }
        if !event_stream {
            return Err(format!("not an event stream: {head}"));
        }
        let first_data;
        let end;
        if chunked {
            let mut pos = header_end;
            let mut first = None;
            loop {
                let line_end = self.read_until(pos, b"\r\n")?;
                let line = String::from_utf8_lossy(&self.buf[pos..line_end]).into_owned();
                let size_text = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
                pos = line_end + 2;
                if size == 0 {
                    // No trailers expected: the last chunk is followed by an empty line.
                    end = self.read_until(pos, b"\r\n")? + 2;
                    break;
                }
                self.read_to(pos + 1)?;
                first.get_or_insert(self.last_read);
                self.read_to(pos + size + 2)?;
                pos += size + 2;
            }
            first_data = first.ok_or("empty chunked body")?;
        } else {
            let len = content_length.ok_or("neither chunked nor Content-Length")?;
            self.read_to(header_end + 1)?;
            first_data = self.last_read;
            self.read_to(header_end + len)?;
            end = header_end + len;
        }
        if self.buf.len() != end {
            return Err("unexpected bytes after the answer".to_owned());
        }
        if find(&self.buf[header_end..], end_marker).is_none() {
            return Err(format!(
                "the stream did not end with {}",
                String::from_utf8_lossy(end_marker)
            ));
        }
        Ok(Timing {
            ttfb: first_data - started,
            total: self.last_read - started,
        })
    }
}

/// Nearest-rank percentile of sorted values, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(mut values: Vec<Duration>) -> String {
    values.sort_unstable();
    format!(
        r#"{{"p50":{:.4},"p90":{:.4},"p99":{:.4},"max":{:.4}}}"#,
        percentile(&values, 50.0),
        percentile(&values, 90.0),
        percentile(&values, 99.0),
        percentile(&values, 100.0)
    )
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut request = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        args.path,
        args.addr,
        args.body.len()
    );
    for header in &args.headers {
        request.push_str(header.trim());
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(&args.body);

    let stream =
        TcpStream::connect(&args.addr).map_err(|e| format!("connect {}: {e}", args.addr))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(64 * 1024),
        last_read: Instant::now(),
    };
    let mut ttfb = Vec::with_capacity(args.requests);
    let mut total = Vec::with_capacity(args.requests);
    for i in 0..args.warmup + args.requests {
        let timing = conn
            .exchange(request.as_bytes(), args.end.as_bytes())
            .map_err(|e| format!("request {i}: {e}"))?;
        if i >= args.warmup {
            ttfb.push(timing.ttfb);
            total.push(timing.total);
        }
    }
    println!(
        r#"{{"requests":{},"ttfb_ms":{},"total_ms":{}}}"#,
        args.requests,
        summary(ttfb),
        summary(total)
    );
    Ok(())
}
