//! `llmctl`: the admin CLI of llm-proxy and `llmctl serve` (the program is in the library).

fn main() -> std::process::ExitCode {
    llmctl::main()
}
