//! The durable sequencer: one task orders entries, writes each batch in one transaction (group
//! commit), extends the Merkle tree and only then answers the waiting callers. It signs
//! checkpoints (periodically, on request and at close) and writes heartbeat entries when the log
//! is quiet. If a write fails the sequencer fails closed: that batch and every later append get
//! an error, so nothing that needs a log entry can be released (docs/audit-log.md, durability).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::{Checkpoint, sign_checkpoint};
use super::entry::{Action, Actor, AuditEntry, Decision};
use super::merkle::{self, Accumulator, Hash};
use super::note::NoteSigner;
use crate::store::{CheckpointRecord, MetadataStore};
use crate::time::SharedClock;

/// Largest number of entries committed in one transaction.
const MAX_BATCH: usize = 512;
/// Entries read per page when the tree is rebuilt at start.
const LOAD_PAGE: u32 = 4096;

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

    /// A value for unit tests of code that consumes one; not available outside tests.
    #[cfg(test)]
    pub(crate) fn for_tests(index: u64, grant_id: Option<String>) -> Self {
        Self { index, grant_id }
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
    /// The stored log does not match its last signed checkpoint: refuse to run.
    #[error("audit log does not match its last signed checkpoint: {0}")]
    Corrupt(String),
}

/// Timing of the background duties.
#[derive(Debug, Clone)]
pub struct SequencerOptions {
    /// A new checkpoint is signed this often while entries arrive.
    pub checkpoint_interval: Duration,
    /// A heartbeat entry is written after this long without entries.
    pub heartbeat_interval: Duration,
}

impl Default for SequencerOptions {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(60),
        }
    }
}

struct Pending {
    bytes: Vec<u8>,
    grant_id: Option<String>,
    done: oneshot::Sender<Result<AuditDurable, AuditError>>,
}

enum Msg {
    Append(Pending),
    Checkpoint(oneshot::Sender<Result<CheckpointRecord, AuditError>>),
    Close(oneshot::Sender<()>),
}

/// The leaf hashes of every durable entry, shared read-only with proof builders.
#[derive(Default)]
pub struct Leaves(RwLock<Vec<Hash>>);

impl Leaves {
    pub fn len(&self) -> u64 {
        self.0.read().expect("leaves lock").len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the first `n` leaf hashes (proofs are computed outside the lock).
    pub fn prefix(&self, n: u64) -> Option<Vec<Hash>> {
        let leaves = self.0.read().expect("leaves lock");
        leaves.get(..usize::try_from(n).ok()?).map(<[Hash]>::to_vec)
    }
}

/// Handle to the sequencer task; cheap to clone.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Msg>,
    failed: Arc<AtomicBool>,
    leaves: Arc<Leaves>,
    size: watch::Receiver<u64>,
    latest: Arc<RwLock<Option<CheckpointRecord>>>,
    verifier_key: String,
}

struct Task {
    store: Arc<dyn MetadataStore>,
    signer: NoteSigner,
    origin: String,
    clock: SharedClock,
    acc: Accumulator,
    leaves: Arc<Leaves>,
    size_tx: watch::Sender<u64>,
    latest: Arc<RwLock<Option<CheckpointRecord>>>,
    failed: Arc<AtomicBool>,
    last_append: tokio::time::Instant,
}

impl Sequencer {
    /// Rebuilds the tree from the stored log, checks it against the last signed checkpoint
    /// (refusing on mismatch) and starts the task.
    pub async fn start(
        store: Arc<dyn MetadataStore>,
        signer: NoteSigner,
        origin: String,
        clock: SharedClock,
        opts: SequencerOptions,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), AuditError> {
        let unavailable = |e: crate::store::StoreError| AuditError::Unavailable(e.to_string());
        let latest = store.latest_checkpoint().await.map_err(unavailable)?;
        let mut acc = Accumulator::new();
        let mut leaves = Vec::new();
        let mut checked = latest
            .as_ref()
            .is_none_or(|cp| cp.size == 0 && cp.root == merkle::empty_root());
        loop {
            let page = store
                .audit_entries(acc.size(), u64::MAX, LOAD_PAGE)
                .await
                .map_err(unavailable)?;
            if page.is_empty() {
                break;
            }
            for (index, entry) in page {
                if index != acc.size() {
                    return Err(AuditError::Corrupt(format!(
                        "entry {} is missing",
                        acc.size()
                    )));
                }
                let h = merkle::leaf_hash(&entry);
                acc.push(h);
                leaves.push(h);
                if let Some(cp) = &latest
                    && acc.size() == cp.size
                {
                    // RFC 9162 §2.1.1: the stored prefix must hash to the signed root.
                    if acc.root() != cp.root {
                        return Err(AuditError::Corrupt(format!(
                            "the first {} entries do not hash to the signed root",
                            cp.size
                        )));
                    }
                    checked = true;
                }
            }
        }
        if !checked {
            return Err(AuditError::Corrupt(format!(
                "the log has {} entries but its last checkpoint covers {}",
                acc.size(),
                latest.as_ref().map_or(0, |c| c.size)
            )));
        }
        if let Some(cp) = &latest {
            let verifier = super::note::NoteVerifier::from_vkey(&signer.verifier_key())
                .map_err(|e| AuditError::Corrupt(format!("log key: {e}")))?;
            super::checkpoint::open_checkpoint(&cp.note, &[verifier]).map_err(|e| {
                AuditError::Corrupt(format!(
                    "the last checkpoint is not signed by this log's key: {e}"
                ))
            })?;
        }
        let size = acc.size();
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let (size_tx, size_rx) = watch::channel(size);
        let failed = Arc::new(AtomicBool::new(false));
        let shared_leaves = Arc::new(Leaves(RwLock::new(leaves)));
        let latest = Arc::new(RwLock::new(latest));
        let verifier_key = signer.verifier_key();
        let task = Task {
            store,
            signer,
            origin,
            clock,
            acc,
            leaves: shared_leaves.clone(),
            size_tx,
            latest: latest.clone(),
            failed: failed.clone(),
            last_append: tokio::time::Instant::now(),
        };
        let handle = tokio::spawn(task.run(rx, opts));
        Ok((
            Self {
                tx,
                failed,
                leaves: shared_leaves,
                size: size_rx,
                latest,
                verifier_key,
            },
            handle,
        ))
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
            .send(Msg::Append(Pending {
                bytes: entry.encode(),
                grant_id: entry.grant_id.clone(),
                done,
            }))
            .await
            .map_err(|_| AuditError::Unavailable("sequencer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("sequencer stopped".into()))?
    }

    /// A checkpoint covering every entry durable at the time of the call (signed now if needed).
    pub async fn checkpoint(&self) -> Result<CheckpointRecord, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(done))
            .await
            .map_err(|_| AuditError::Unavailable("sequencer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("sequencer stopped".into()))?
    }

    /// Writes the final checkpoint and stops the task; later appends fail.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The latest signed checkpoint, without waiting.
    pub fn latest_checkpoint(&self) -> Option<CheckpointRecord> {
        self.latest.read().expect("checkpoint lock").clone()
    }

    /// The log's C2SP signed-note verifier key.
    pub fn verifier_key(&self) -> &str {
        &self.verifier_key
    }

    pub fn leaves(&self) -> &Arc<Leaves> {
        &self.leaves
    }

    /// Watches the number of durable entries.
    pub fn size(&self) -> watch::Receiver<u64> {
        self.size.clone()
    }
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, opts: SequencerOptions) {
        let mut tick = tokio::time::interval(opts.checkpoint_interval.min(opts.heartbeat_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = tokio::time::Instant::now();
        let mut msgs = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut msgs, MAX_BATCH) => {
                    if n == 0 {
                        self.close_out().await;
                        return;
                    }
                    let mut appends = Vec::new();
                    let mut waiters = Vec::new();
                    let mut close = None;
                    for m in msgs.drain(..) {
                        match m {
                            Msg::Append(p) => appends.push(p),
                            Msg::Checkpoint(w) => waiters.push(w),
                            Msg::Close(w) => close = Some(w),
                        }
                    }
                    if !appends.is_empty() {
                        self.write(appends).await;
                    }
                    for w in waiters {
                        let _ = w.send(self.sign_if_new().await);
                    }
                    if let Some(w) = close {
                        self.close_out().await;
                        let _ = w.send(());
                        return;
                    }
                }
                _ = tick.tick() => {
                    if self.last_append.elapsed() >= opts.heartbeat_interval && !self.failed.load(Ordering::SeqCst) {
                        let mut e = AuditEntry::new(self.clock.now_ms(), Action::Heartbeat, Decision::Info, Actor::system());
                        e.reason = Some(format!("log size {}", self.acc.size()));
                        let (done, _ignored) = oneshot::channel();
                        self.write(vec![Pending { bytes: e.encode(), grant_id: None, done }]).await;
                    }
                    if last_checkpoint.elapsed() >= opts.checkpoint_interval {
                        last_checkpoint = tokio::time::Instant::now();
                        let _ = self.sign_if_new().await;
                    }
                }
            }
        }
    }

    async fn write(&mut self, mut batch: Vec<Pending>) {
        if self.failed.load(Ordering::SeqCst) {
            for p in batch {
                let _ = p.done.send(Err(AuditError::Unavailable(
                    "a previous write failed".into(),
                )));
            }
            return;
        }
        let bytes: Vec<Vec<u8>> = batch
            .iter_mut()
            .map(|p| std::mem::take(&mut p.bytes))
            .collect();
        match self.store.append_audit(&bytes).await {
            Ok(first) if first == self.acc.size() => {
                let hashes: Vec<Hash> = bytes.iter().map(|b| merkle::leaf_hash(b)).collect();
                for h in &hashes {
                    self.acc.push(*h);
                }
                self.leaves
                    .0
                    .write()
                    .expect("leaves lock")
                    .extend_from_slice(&hashes);
                let _ = self.size_tx.send(self.acc.size());
                self.last_append = tokio::time::Instant::now();
                for (n, p) in batch.into_iter().enumerate() {
                    let _ = p.done.send(Ok(AuditDurable {
                        index: first + n as u64,
                        grant_id: p.grant_id,
                    }));
                }
            }
            other => {
                self.failed.store(true, Ordering::SeqCst);
                match other {
                    Ok(first) => tracing::error!(
                        first,
                        expected = self.acc.size(),
                        "another writer appended to the audit log; refusing all access until restart"
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "audit log write failed; refusing all access until restart")
                    }
                }
                for p in batch {
                    let _ = p
                        .done
                        .send(Err(AuditError::Unavailable("write failed".into())));
                }
            }
        }
    }

    /// Signs a checkpoint of the current tree unless the latest one already covers it. The tree
    /// only grows by appends in this task, so each checkpoint extends the previous one.
    async fn sign_if_new(&mut self) -> Result<CheckpointRecord, AuditError> {
        if let Some(cp) = self.latest.read().expect("checkpoint lock").clone()
            && cp.size == self.acc.size()
        {
            return Ok(cp);
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(AuditError::Unavailable("a previous write failed".into()));
        }
        let root = self.acc.root();
        let body = Checkpoint {
            origin: self.origin.clone(),
            size: self.acc.size(),
            root,
            extensions: Vec::new(),
        };
        let note = sign_checkpoint(&self.signer, &body)
            .map_err(|e| AuditError::Unavailable(format!("signing checkpoint: {e}")))?;
        let rec = CheckpointRecord {
            size: body.size,
            root,
            note,
            created_ms: self.clock.now_ms(),
        };
        if let Err(e) = self.store.put_checkpoint(&rec).await {
            self.failed.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "storing a checkpoint failed; refusing all access until restart");
            return Err(AuditError::Unavailable("storing checkpoint failed".into()));
        }
        *self.latest.write().expect("checkpoint lock") = Some(rec.clone());
        Ok(rec)
    }

    async fn close_out(&mut self) {
        if let Err(e) = self.sign_if_new().await {
            tracing::error!(error = %e, "final checkpoint not written");
        }
        self.failed.store(true, Ordering::SeqCst);
    }
}
