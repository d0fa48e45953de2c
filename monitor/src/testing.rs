//! Test support shared by the unit tests.

/// Records a skipped test (only when the kernel lacks a feature): printed, and appended to the
/// file named by HOLDFAST_SKIPS so that `cargo xtask test` counts and names it in its summary.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIP: {test}: {reason}");
    if let Some(path) = std::env::var_os("HOLDFAST_SKIPS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}
