//! The durable sequencer: one task orders entries, writes each batch in one transaction (group
//! commit), extends the Merkle tree and only then answers the waiting callers. It signs
//! checkpoints (periodically, on request and at close) and writes heartbeat entries when the log
//! is quiet. If a write fails the sequencer fails closed: that batch and every later append get
//! an error, so nothing that needs a log entry can be released (docs/audit-log.md, durability).
//!
//! When several replicas share one store ([`SequencerOptions::lease`] set), each replica runs
//! its own sequencer over the same log. The store gives every batch the next indexes under its
//! own lock (one total order, no gaps, no duplicates); a sequencer whose batch landed after
//! other replicas' entries first reads those entries back and adds them to its tree, so every
//! replica's tree is a prefix of the one tree of the log. Heartbeats and periodic checkpoints
//! come from the replica holding the store's lease; when it dies the lease expires and another
//! replica takes the duties over (docs/architecture.md, Scale-out).

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
    /// Set when other replicas append to the same store: the lease's time to live. `None`
    /// means this sequencer is the only writer (the embedded store, one vault per data
    /// directory), and any entry it did not write is a fault.
    pub lease: Option<Duration>,
}

impl Default for SequencerOptions {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(60),
            lease: None,
        }
    }
}

/// This replica's claim on the store's sequencer lease.
struct Lease {
    holder: String,
    ttl: Duration,
    held: Arc<AtomicBool>,
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
    lease_held: Arc<AtomicBool>,
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
    lease: Option<Lease>,
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
        // A sole writer holds the duties from the start; replicas contend for the lease.
        let lease_held = Arc::new(AtomicBool::new(opts.lease.is_none()));
        let lease = match opts.lease {
            Some(ttl) => {
                let holder = hex::encode(
                    crate::grant::random::<16>()
                        .map_err(|e| AuditError::Unavailable(format!("lease holder id: {e}")))?,
                );
                Some(Lease {
                    holder,
                    ttl,
                    held: lease_held.clone(),
                })
            }
            None => None,
        };
        let mut task = Task {
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
            lease,
        };
        // The first replica to start holds the lease from the beginning.
        task.renew_lease().await;
        let handle = tokio::spawn(task.run(rx, opts));
        Ok((
            Self {
                tx,
                failed,
                leaves: shared_leaves,
                size: size_rx,
                latest,
                verifier_key,
                lease_held,
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

    /// Whether this sequencer holds the store's lease (always true for a sole writer once
    /// started; with replicas, true on the one that writes heartbeats and periodic checkpoints).
    pub fn holds_lease(&self) -> bool {
        self.lease_held.load(Ordering::SeqCst)
    }
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, opts: SequencerOptions) {
        // The lease is renewed on this tick: three renewals per time to live, so that a renewal
        // a little late (a busy machine, a slow query) does not let the lease lapse.
        let mut period = opts.checkpoint_interval.min(opts.heartbeat_interval);
        if let Some(ttl) = opts.lease {
            period = period.min(ttl / 3);
        }
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
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
                    if !waiters.is_empty() && self.lease.is_some() && !self.failed.load(Ordering::SeqCst) {
                        // "Every entry durable at the time of the call" includes other replicas'.
                        self.catch_up_or_fail(None).await;
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
                    if self.lease.is_some() && !self.failed.load(Ordering::SeqCst) {
                        // Entries other replicas wrote: proofs, tails and quiet-time count them.
                        self.catch_up_or_fail(None).await;
                        if !self.renew_lease().await {
                            continue;
                        }
                    }
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
        let mut appended = self.store.append_audit(&bytes).await;
        if let Ok(first) = appended
            && first > self.acc.size()
            && self.lease.is_some()
        {
            // Other replicas appended since this tree was last extended: their entries come
            // first in the tree, exactly as they do in the log.
            if let Err(e) = self.catch_up(Some(first)).await {
                appended = Err(e);
            }
        }
        match appended {
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
        if self.lease.is_some() && !self.failed.load(Ordering::SeqCst) {
            self.catch_up_or_fail(None).await;
        }
        if let Err(e) = self.sign_if_new().await {
            tracing::error!(error = %e, "final checkpoint not written");
        }
        self.failed.store(true, Ordering::SeqCst);
        if let Some(lease) = &self.lease
            && lease.held.swap(false, Ordering::SeqCst)
        {
            // Released at once, so another replica need not wait for it to expire.
            if let Err(e) = self.store.audit_lease(&lease.holder, 0).await {
                tracing::warn!(error = %e, "releasing the sequencer lease failed; it will expire");
            }
        }
    }

    /// Takes or renews the lease; returns whether this replica holds it. A sole writer always
    /// does. A store error counts as not holding it: the duties wait for the next tick.
    async fn renew_lease(&mut self) -> bool {
        let Some(lease) = &self.lease else {
            return true;
        };
        let ttl_ms = u64::try_from(lease.ttl.as_millis()).unwrap_or(u64::MAX);
        let held = match self.store.audit_lease(&lease.holder, ttl_ms).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the sequencer lease failed");
                false
            }
        };
        if lease.held.swap(held, Ordering::SeqCst) != held {
            tracing::info!(holder = %lease.holder, held, "sequencer lease changed hands");
        }
        held
    }

    /// Extends the tree with entries other replicas appended, up to `to` (which must be
    /// reached) or to the end of the stored log.
    async fn catch_up(&mut self, to: Option<u64>) -> Result<(), crate::store::StoreError> {
        let before = self.acc.size();
        loop {
            let end = to.unwrap_or(u64::MAX);
            if self.acc.size() >= end {
                break;
            }
            let page = self
                .store
                .audit_entries(self.acc.size(), end, LOAD_PAGE)
                .await?;
            if page.is_empty() {
                if to.is_some() {
                    return Err(crate::store::StoreError::Corrupt(format!(
                        "audit entry {} is missing",
                        self.acc.size()
                    )));
                }
                break;
            }
            let mut hashes = Vec::with_capacity(page.len());
            for (index, entry) in page {
                if index != self.acc.size() {
                    return Err(crate::store::StoreError::Corrupt(format!(
                        "audit entry {} is missing",
                        self.acc.size()
                    )));
                }
                let h = merkle::leaf_hash(&entry);
                self.acc.push(h);
                hashes.push(h);
            }
            self.leaves
                .0
                .write()
                .expect("leaves lock")
                .extend_from_slice(&hashes);
        }
        if self.acc.size() > before {
            let _ = self.size_tx.send(self.acc.size());
            self.last_append = tokio::time::Instant::now();
        }
        Ok(())
    }

    /// [`Task::catch_up`] to the end of the log. A gap in the stored log fails the log closed;
    /// a read error leaves the tree as it is (still a prefix of the log) for the next attempt.
    async fn catch_up_or_fail(&mut self, to: Option<u64>) {
        match self.catch_up(to).await {
            Ok(()) => {}
            Err(e @ crate::store::StoreError::Corrupt(_)) => {
                self.failed.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "the stored audit log has a gap; refusing all access until restart");
            }
            Err(e) => tracing::warn!(error = %e, "reading other replicas' audit entries failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::time::ManualClock;
    use aws_lc_rs::signature::Ed25519KeyPair;

    fn signer(pkcs8: &[u8]) -> NoteSigner {
        NoteSigner::new("test/log", Ed25519KeyPair::from_pkcs8(pkcs8).unwrap()).unwrap()
    }

    fn entry(n: u64) -> AuditEntry {
        let mut e = AuditEntry::new(n, Action::Challenge, Decision::Info, Actor::system());
        e.reason = Some(format!("entry {n}"));
        e
    }

    /// Two sequencers on one store, as two replicas: appends interleave in one order, each
    /// tree takes in the other's entries, and their checkpoints agree with the stored log.
    #[tokio::test]
    async fn replicas_extend_one_tree() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn MetadataStore> =
            Arc::new(SqliteStore::open(&dir.path().join("m.db")).await.unwrap());
        let key = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let clock: SharedClock = Arc::new(ManualClock::new(1));
        let opts = SequencerOptions {
            lease: Some(Duration::from_secs(5)),
            ..SequencerOptions::default()
        };
        let start = || {
            Sequencer::start(
                store.clone(),
                signer(key.as_ref()),
                "test/log".into(),
                clock.clone(),
                opts.clone(),
            )
        };
        let (a, ta) = start().await.unwrap();
        let (b, tb) = start().await.unwrap();
        let mut indexes = Vec::new();
        for n in 0..6 {
            let (s, other) = if n % 2 == 0 { (&a, &b) } else { (&b, &a) };
            indexes.push(s.append(&entry(n)).await.unwrap().index());
            indexes.push(s.append(&entry(100 + n)).await.unwrap().index());
            // The other replica has not seen these yet; its next append catches up.
            assert!(other.leaves().len() <= s.leaves().len());
        }
        assert_eq!(indexes, (0..12).collect::<Vec<u64>>());
        let ca = a.checkpoint().await.unwrap();
        let cb = b.checkpoint().await.unwrap();
        assert_eq!((ca.size, cb.size), (12, 12));
        assert_eq!(ca.root, cb.root);
        let stored = store.audit_entries(0, u64::MAX, 100).await.unwrap();
        let leaves: Vec<Hash> = stored.iter().map(|(_, e)| merkle::leaf_hash(e)).collect();
        assert_eq!(merkle::root(&leaves), ca.root);
        assert_eq!(a.leaves().prefix(12).unwrap(), leaves);
        assert!(!a.is_failed() && !b.is_failed());
        a.close().await;
        b.close().await;
        ta.await.unwrap();
        tb.await.unwrap();
    }

    /// Without a lease (the embedded store) an entry this sequencer did not write is a fault:
    /// it fails closed instead of adopting it.
    #[tokio::test]
    async fn a_sole_writer_fails_closed_on_a_foreign_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn MetadataStore> =
            Arc::new(SqliteStore::open(&dir.path().join("m.db")).await.unwrap());
        let key = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let (s, task) = Sequencer::start(
            store.clone(),
            signer(key.as_ref()),
            "test/log".into(),
            Arc::new(ManualClock::new(1)),
            SequencerOptions::default(),
        )
        .await
        .unwrap();
        assert!(s.holds_lease());
        s.append(&entry(1)).await.unwrap();
        store.append_audit(&[b"foreign".to_vec()]).await.unwrap();
        assert!(s.append(&entry(2)).await.is_err());
        assert!(s.is_failed());
        s.close().await;
        task.await.unwrap();
    }
}
