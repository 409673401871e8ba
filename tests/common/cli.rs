//! A `weightvault serve --dev` child process and helpers to run CLI commands against it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_weightvault");
pub const CLI_MEASUREMENT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00";

pub struct Server {
    pub child: Child,
    pub env: Vec<(String, String)>,
    pub dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `weightvault serve --dev` and reads the client environment it prints.
pub fn serve(dir: &Path) -> Server {
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut env = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        if let Some(kv) = line.strip_prefix("export ") {
            let (k, v) = kv.split_once('=').unwrap();
            env.push((k.to_string(), v.to_string()));
        }
    }
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    assert_eq!(
        env.len(),
        4,
        "serve --dev prints the four WEIGHTVAULT_* variables"
    );
    Server {
        child,
        env,
        dir: dir.to_path_buf(),
    }
}

impl Server {
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], extra: &[(&str, PathBuf)]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.env_remove("HOME").env_remove("XDG_DATA_HOME");
        cmd.output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn auditor(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("WEIGHTVAULT_CLIENT_CERT", self.dir.join("tls/auditor.pem")),
            (
                "WEIGHTVAULT_CLIENT_KEY",
                self.dir.join("tls/auditor-key.pem"),
            ),
        ]
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
