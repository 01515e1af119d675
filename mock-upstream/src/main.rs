//! `llm-proxy-mock-upstream`: the mock of every upstream provider (see the library docs), for the
//! e2e suite and the benchmark.
//!
//! Usage: `llm-proxy-mock-upstream [ADDR] [--bench [--delay-ms N] [--chunk-delay-ms N]]`. It
//! prints `listening on http://ADDR` once it accepts connections (ADDR `127.0.0.1:0` picks a free
//! port).

use axum::serve::ListenerExt as _;
use clap::Parser;
use llm_proxy_mock_upstream::bench::{self, Timing};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    about = "Mock of the OpenAI (chat and Responses), Azure, Anthropic, Google and Bedrock APIs for tests and benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:9000")]
    listen: String,
    /// Benchmark mode: one fixed OpenAI answer for every POST (an Anthropic one on the Messages
    /// paths, a Responses API one on paths ending in `/responses`), nothing recorded or checked.
    #[arg(long)]
    bench: bool,
    /// Benchmark mode: delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0, requires = "bench")]
    delay_ms: u64,
    /// Benchmark mode: delay between the events of a streamed answer, in milliseconds.
    #[arg(long, default_value_t = 2, requires = "bench")]
    chunk_delay_ms: u64,
}

// One thread: the benchmark pins the mock to the load generator's core.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // No Nagle: SSE events are small writes, and waiting for the client's delayed ACK would hold
    // each one back by up to 40 ms.
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            eprintln!("llm-proxy-mock-upstream: cannot set TCP_NODELAY: {err}");
        }
    });
    let app = if args.bench {
        let timing = Timing {
            delay: Duration::from_millis(args.delay_ms),
            chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        };
        axum::Router::new().fallback(
            move |uri: axum::http::Uri, body: axum::body::Bytes| async move {
                bench::answer(timing, uri.path(), body).await
            },
        )
    } else {
        llm_proxy_mock_upstream::router(Arc::default())
    };
    println!("listening on http://{addr}");
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Args::command().debug_assert();
    }
}
