//! The typed model: what holdfast observes and concludes. Plain data shared by the agent, the
//! sinks, the IPC protocol and the CLI; no I/O here.
pub mod action;
pub mod eviction;
pub mod finding;
pub mod flow;
pub mod health;
pub mod leaks;
pub mod observe;
pub mod probe;
pub mod process;
pub mod time;
