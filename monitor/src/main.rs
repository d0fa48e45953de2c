//! `holdfast`: the agent and its CLI (all logic lives in the library).
fn main() -> std::process::ExitCode {
    holdfast::cli::main()
}
