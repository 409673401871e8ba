//! The Rust client of the vault, on which the CLI is built. [`Endpoint`] holds where the vault is
//! and how to trust it; [`admin`], [`node`] and [`audit`] wrap the three services.

pub mod admin;
pub mod audit;
mod chunk_stream;
pub mod collect;
pub mod node;
pub mod operator;

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::server::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

/// Environment variables every command reads (flags override them).
pub const ENV_ADDR: &str = "WEIGHTVAULT_ADDR";
pub const ENV_CACERT: &str = "WEIGHTVAULT_CACERT";
pub const ENV_CLIENT_CERT: &str = "WEIGHTVAULT_CLIENT_CERT";
pub const ENV_CLIENT_KEY: &str = "WEIGHTVAULT_CLIENT_KEY";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The vault refused or failed the call.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error("cannot connect to the vault at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    /// The vault's answer broke the protocol (bad manifest, missing chunk, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A chunk or the sealed key did not authenticate; nothing of it was kept.
    #[error("decryption failed")]
    DecryptionFailed,
}

// Not `#[from]`: a status is shown as code and message only, not as a chain of causes.
impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

impl ClientError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ClientError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The gRPC code, when the vault answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Stable upper-case names of gRPC codes (as in the gRPC specification).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Where the vault is and how to talk to it.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port` or `https://host:port`.
    pub addr: String,
    /// PEM of the CA that issued the vault's server certificate.
    pub ca_pem: Vec<u8>,
    /// Client certificate and key (PEM) for admin and auditor calls; nodes have none.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Endpoint {
    /// Reads the CA and (optionally) the client certificate and key from files.
    pub fn from_files(
        addr: &str,
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| ClientError::io(p, e));
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(ClientError::Usage(format!(
                    "a client certificate needs its key and the other way round ({ENV_CLIENT_CERT}, {ENV_CLIENT_KEY})"
                )));
            }
        };
        Ok(Self {
            addr: addr.to_string(),
            ca_pem: read(ca)?,
            identity,
        })
    }

    fn uri(&self) -> String {
        if self.addr.starts_with("https://") {
            self.addr.clone()
        } else {
            format!("https://{}", self.addr)
        }
    }

    /// Opens a TLS channel with HTTP/2 windows sized for weight streaming.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let connect_err = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tonic::transport::Endpoint::from_shared(self.uri())
            .map_err(|_| ClientError::Usage(format!("invalid vault address {:?}", self.addr)))?
            .tls_config(tls)
            .map_err(connect_err)?
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .map_err(connect_err)
    }
}

/// Every regular file to push from `path`: the file itself, or all regular files under the
/// directory (recursively, symlinks to files followed, symlinked directories refused), as
/// `(path inside the model, path on disk, size)` sorted by model path.
pub fn collect_files(path: &Path) -> Result<Vec<(String, PathBuf, u64)>, ClientError> {
    let meta = std::fs::metadata(path).map_err(|e| ClientError::io(path, e))?;
    let mut out = Vec::new();
    if meta.is_file() {
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            ClientError::Usage(format!("{}: file name is not UTF-8", path.display()))
        })?;
        out.push((name.to_string(), path.to_path_buf(), meta.len()));
    } else if meta.is_dir() {
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(|e| ClientError::io(&dir, e))? {
                let entry = entry.map_err(|e| ClientError::io(&dir, e))?;
                let p = entry.path();
                let ft = entry.file_type().map_err(|e| ClientError::io(&p, e))?;
                let m = std::fs::metadata(&p).map_err(|e| ClientError::io(&p, e))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if m.is_file() {
                    let rel = p
                        .strip_prefix(path)
                        .expect("under the root")
                        .to_str()
                        .ok_or_else(|| {
                            ClientError::Usage(format!("{}: path is not UTF-8", p.display()))
                        })?
                        .replace(std::path::MAIN_SEPARATOR, "/");
                    out.push((rel, p, m.len()));
                } else if m.is_dir() {
                    return Err(ClientError::Usage(format!(
                        "{}: symlinked directories are not followed",
                        p.display()
                    )));
                }
            }
        }
        if out.is_empty() {
            return Err(ClientError::Usage(format!(
                "{}: directory has no regular files to push",
                path.display()
            )));
        }
    } else {
        return Err(ClientError::Usage(format!(
            "{}: not a regular file or directory",
            path.display()
        )));
    }
    for (rel, p, _) in &out {
        crate::envelope::manifest::validate_path(rel)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))?;
        // Unreadable files fail here, before anything is sent.
        std::fs::File::open(p).map_err(|e| ClientError::io(p, e))?;
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
