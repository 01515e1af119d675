//! `llm-proxy`: `llmctl` under the name the seed's guide uses (`./llm-proxy serve`,
//! `./llm-proxy connection add ...`).

fn main() -> std::process::ExitCode {
    llmctl::main()
}
