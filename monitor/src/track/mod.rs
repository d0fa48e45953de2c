//! State fed by observations: the flow table and the zombie tracker. The detectors judge it.
pub mod flows;
pub mod held;
pub mod paths;
pub mod watch;
pub mod zombies;
