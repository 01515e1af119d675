//! `llm-proxy-data-plane`: placeholder binary until the data-plane issue lands.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("llm-proxy-data-plane is not implemented yet; see the project's open issues")
}
