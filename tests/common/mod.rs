//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, empty folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("nuwa-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared corpus beside the project.
pub fn shakespeare() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt")
}

/// `nuwa train` flags for a quick run of a one-layer, 32-wide model on tiny batches.
pub const TINY_MODEL: &[&str] = &[
    "--layers",
    "1",
    "--hidden-size",
    "32",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--quiet",
    "--sample-tokens",
    "0",
];

/// Runs the `nuwa` binary.
pub fn nuwa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nuwa"))
        .args(args)
        .output()
        .expect("running nuwa")
}

/// Asserts a command failed with one clear `error:` line and no panic, mentioning `needle`.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {stderr}");
    assert!(
        stderr.contains(needle),
        "error should mention {needle:?}: {stderr}"
    );
}
