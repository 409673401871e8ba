//! The durable sequencer: one task orders entries, writes each batch in one transaction (group
//! commit) and only then answers the waiting callers. If a write fails the sequencer fails
//! closed: that batch and every later append get an error, so nothing that needs a log entry can
//! be released (DESIGN.md "Durability rule").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::entry::AuditEntry;
use crate::store::MetadataStore;

/// Largest number of entries committed in one transaction.
const MAX_BATCH: usize = 512;

/// Proof that an entry is durable in the log; only the sequencer constructs it.
#[derive(Debug)]
pub struct AuditDurable {
    index: u64,
    grant_id: Option<String>,
}

impl AuditDurable {
    /// The entry's index in the log.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The grant id the durable entry names, if any.
    pub fn grant_id(&self) -> Option<&str> {
        self.grant_id.as_deref()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
}

struct Pending {
    bytes: Vec<u8>,
    grant_id: Option<String>,
    done: oneshot::Sender<Result<AuditDurable, AuditError>>,
}

/// Handle to the sequencer task; cheap to clone.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Pending>,
    failed: Arc<AtomicBool>,
}

impl Sequencer {
    /// Starts the sequencer task. It ends when every handle is dropped.
    pub fn start(store: Arc<dyn MetadataStore>) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let failed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(store, rx, failed.clone()));
        (Self { tx, failed }, task)
    }

    /// Whether the log has failed and the vault is refusing access.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Appends an entry and waits until it is durable.
    pub async fn append(&self, entry: &AuditEntry) -> Result<AuditDurable, AuditError> {
        if self.is_failed() {
            return Err(AuditError::Unavailable("a previous write failed".into()));
        }
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                bytes: entry.encode(),
                grant_id: entry.grant_id.clone(),
                done,
            })
            .await
            .map_err(|_| AuditError::Unavailable("sequencer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("sequencer stopped".into()))?
    }
}

async fn run(
    store: Arc<dyn MetadataStore>,
    mut rx: mpsc::Receiver<Pending>,
    failed: Arc<AtomicBool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if failed.load(Ordering::SeqCst) {
            for p in batch.drain(..) {
                let _ = p.done.send(Err(AuditError::Unavailable(
                    "a previous write failed".into(),
                )));
            }
            continue;
        }
        let bytes: Vec<Vec<u8>> = batch
            .iter_mut()
            .map(|p| std::mem::take(&mut p.bytes))
            .collect();
        match store.append_audit(&bytes).await {
            Ok(first) => {
                for (n, p) in batch.drain(..).enumerate() {
                    let _ = p.done.send(Ok(AuditDurable {
                        index: first + n as u64,
                        grant_id: p.grant_id,
                    }));
                }
            }
            Err(e) => {
                failed.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "audit log write failed; refusing all access until restart");
                for p in batch.drain(..) {
                    let _ = p
                        .done
                        .send(Err(AuditError::Unavailable("write failed".into())));
                }
            }
        }
    }
}
