//! holdfast library: all logic of the agent and CLI; `main.rs` only calls [`cli::main`].
pub mod btf;
pub mod decode;
pub mod ebpf;
pub mod observe;
pub mod sys;
