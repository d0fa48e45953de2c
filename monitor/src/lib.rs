//! holdfast library: all logic of the agent and CLI; `main.rs` only calls [`cli::main`].
//!
//! Layers, each using only those listed before it: `model` (typed data), `config` (file and
//! runtime policy), `kernel` (every source and syscall), `track` (state fed by observations),
//! `findings` (the lifecycle store), `detect` (pure judges), `remedy` (actions), `sinks`
//! (journald, metrics, notices), `ipc` (the protocol), `agent` (the state owner and its
//! workers), `cli` (commands).
pub mod agent;
pub mod cli;
pub mod config;
pub mod detect;
pub mod findings;
pub mod ipc;
pub mod kernel;
pub mod model;
pub mod remedy;
pub mod sinks;
pub mod track;

#[cfg(test)]
mod testing;
