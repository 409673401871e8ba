//! Egress budgets: bytes allowed per grant, per node per time window and per model per time
//! window (docs/access-control.md). Charged before each chunk leaves, so a budget stops a stream
//! within one chunk. Counters live in this process: a restart resets the windows (the per-grant
//! count resumes from the bytes recorded in the store).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::config::BudgetsConfig;
use crate::store::GrantRecord;
use crate::time::UnixMs;

/// Which budget a chunk would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Grant,
    Node,
    Model,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Grant => "grant",
            Scope::Node => "node",
            Scope::Model => "model",
        }
    }
}

/// Bytes charged in a sliding window.
#[derive(Default)]
struct Window {
    events: VecDeque<(UnixMs, u64)>,
    total: u64,
}

impl Window {
    fn expire(&mut self, now: UnixMs, window_ms: u64) {
        while let Some(&(t, b)) = self.events.front() {
            if now.saturating_sub(t) < window_ms {
                break;
            }
            self.total -= b;
            self.events.pop_front();
        }
    }
}

#[derive(Default)]
struct Counters {
    grants: HashMap<String, u64>,
    nodes: HashMap<String, Window>,
    models: HashMap<String, Window>,
}

pub struct Budgets {
    cfg: BudgetsConfig,
    counters: Mutex<Counters>,
}

impl Budgets {
    pub fn new(cfg: BudgetsConfig) -> Self {
        Self {
            cfg,
            counters: Mutex::new(Counters::default()),
        }
    }

    /// Bytes a grant may serve: the version's ciphertext size plus the configured allowance for
    /// retries, and at least one more chunk.
    pub fn grant_limit(&self, version_cipher_bytes: u64, chunk_bytes: u64) -> u64 {
        let allowance =
            version_cipher_bytes.saturating_mul(u64::from(self.cfg.grant_allowance_percent)) / 100;
        version_cipher_bytes
            .saturating_add(allowance)
            .saturating_add(chunk_bytes)
    }

    /// Charges `bytes` to the grant, its node and its model, or refuses without charging.
    pub fn charge(
        &self,
        grant: &GrantRecord,
        grant_limit: u64,
        bytes: u64,
        now: UnixMs,
    ) -> Result<(), Scope> {
        let window_ms = self.cfg.window_secs.saturating_mul(1000);
        let mut c = self.counters.lock().expect("budget lock");
        let served = *c
            .grants
            .entry(grant.grant_id.clone())
            .or_insert(grant.bytes_served);
        if served.saturating_add(bytes) > grant_limit {
            return Err(Scope::Grant);
        }
        let node_key = format!("{}/{}", grant.tee, grant.instance_id);
        for (scope, key, limit) in [
            (Scope::Node, &node_key, self.cfg.node_bytes_per_window),
            (Scope::Model, &grant.model, self.cfg.model_bytes_per_window),
        ] {
            if limit == 0 {
                continue;
            }
            let map = if scope == Scope::Node {
                &mut c.nodes
            } else {
                &mut c.models
            };
            let w = map.entry(key.clone()).or_default();
            w.expire(now, window_ms);
            if w.total.saturating_add(bytes) > limit {
                return Err(scope);
            }
        }
        *c.grants.get_mut(&grant.grant_id).expect("inserted above") += bytes;
        for (scope, key, limit) in [
            (Scope::Node, &node_key, self.cfg.node_bytes_per_window),
            (Scope::Model, &grant.model, self.cfg.model_bytes_per_window),
        ] {
            if limit == 0 {
                continue;
            }
            let map = if scope == Scope::Node {
                &mut c.nodes
            } else {
                &mut c.models
            };
            let w = map.entry(key.clone()).or_default();
            w.events.push_back((now, bytes));
            w.total += bytes;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, node: &str, served: u64) -> GrantRecord {
        GrantRecord {
            grant_id: id.into(),
            session_sha256: [0; 32],
            model: "m".into(),
            version: 1,
            node_public_key: [0; 32],
            instance_id: node.into(),
            tee: "sim".into(),
            measurement: "aa".into(),
            created_ms: 0,
            not_after_ms: u64::MAX,
            revoked: false,
            bytes_served: served,
        }
    }

    #[test]
    fn grant_node_and_model_budgets() {
        let b = Budgets::new(BudgetsConfig {
            grant_allowance_percent: 10,
            node_bytes_per_window: 250,
            model_bytes_per_window: 400,
            window_secs: 10,
        });
        assert_eq!(b.grant_limit(1000, 16), 1116);
        let g1 = grant("g1", "n1", 0);
        b.charge(&g1, 150, 100, 0).unwrap();
        assert_eq!(b.charge(&g1, 150, 100, 0), Err(Scope::Grant));
        let g2 = grant("g2", "n1", 0);
        b.charge(&g2, 1000, 150, 0).unwrap();
        // Node n1 has 250 of 250 in the window.
        assert_eq!(b.charge(&g2, 1000, 1, 0), Err(Scope::Node));
        let g3 = grant("g3", "n2", 0);
        b.charge(&g3, 1000, 150, 0).unwrap();
        // Model m has 400 of 400.
        assert_eq!(b.charge(&g3, 1000, 1, 0), Err(Scope::Model));
        // After the window, the node and model budgets refill; the grant's does not.
        b.charge(&g3, 1000, 100, 10_000).unwrap();
        assert_eq!(b.charge(&g1, 150, 100, 10_000), Err(Scope::Grant));
        // A grant resumes from the bytes the store recorded.
        let resumed = grant("g4", "n3", 140);
        assert_eq!(b.charge(&resumed, 150, 20, 20_000), Err(Scope::Grant));
    }
}
