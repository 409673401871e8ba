//! The shared vectors in `../shared/vectors` (beside the repository; never copied into it).
//! A test that needs them fails under `CI=true` when they are missing, and elsewhere says that
//! it was skipped and why. Included by path (`#[path = "common/vectors.rs"]`) from tests that do
//! not need the server harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `../shared/vectors/<rel>`, if it holds `probe` (a file or directory inside it, `""` for the
/// directory itself). `what` names the vectors in the messages.
pub fn shared(rel: &str, probe: &str, what: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/vectors")
        .join(rel);
    if dir.join(probe).exists() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{what} vectors not found at {} (required when CI=true: CI must provide ../shared/vectors)",
            dir.join(probe).display()
        );
    }
    eprintln!(
        "skipped: {what} vectors not found at {}",
        dir.join(probe).display()
    );
    None
}
