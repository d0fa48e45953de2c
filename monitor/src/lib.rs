//! holdfast library: all logic of the agent and CLI; `main.rs` only calls [`cli::main`].
pub mod agent;
pub mod btf;
pub mod cli;
pub mod config;
pub mod decode;
pub mod ebpf;
pub mod flows;
pub mod human;
pub mod ipc;
pub mod observe;
pub mod owners;
pub mod render;
pub mod sockdiag;
pub mod sys;
