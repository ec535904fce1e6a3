//! The agent's Prometheus metrics (text format by `prometheus-client`), and how CNI operations
//! reach them without adding I/O to ADD and DEL: every plugin run holds its network's pool
//! lock file open anyway, so it appends one line to that file when it ends
//! ([`crate::ipam::store::record_op`]); the agent reads what was appended since its last look.
//! host-local only flocks that file and never reads it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ipam::Pool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Net {
    pub network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    pub network: String,
    pub verb: String,
    /// `ok`, or the CNI error code.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Verb {
    pub network: String,
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

fn op_buckets() -> Histogram {
    // 0.5 ms .. ~4 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

pub struct Metrics {
    registry: Registry,
    pub pool_size: Family<Net, Gauge>,
    pub pool_used: Family<Net, Gauge>,
    pub pool_stale: Family<Net, Gauge>,
    pub pool_reclaimed: Family<Net, Counter>,
    pub cni_ops: Family<Op, Counter>,
    pub cni_duration: Family<Verb, Histogram, fn() -> Histogram>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<Kind, Counter>,
    pub routes: Gauge,
    pub firewall_heals: Counter,
    pub ready: Gauge,
    pub last_reconcile: Gauge,
    /// Read positions in the pool lock files.
    offsets: HashMap<PathBuf, u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pontoon");
        let m = Metrics {
            pool_size: Family::default(),
            pool_used: Family::default(),
            pool_stale: Family::default(),
            pool_reclaimed: Family::default(),
            cni_ops: Family::default(),
            cni_duration: Family::new_with_constructor(op_buckets),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            reconcile_errors: Family::default(),
            routes: Gauge::default(),
            firewall_heals: Counter::default(),
            ready: Gauge::default(),
            last_reconcile: Gauge::default(),
            registry: Registry::default(),
            offsets: HashMap::new(),
        };
        registry.register(
            "pool_addresses",
            "Addresses the network's pool can hand out",
            m.pool_size.clone(),
        );
        registry.register(
            "pool_used_addresses",
            "Addresses allocated in the network's pool",
            m.pool_used.clone(),
        );
        registry.register(
            "pool_stale_addresses",
            "Allocated addresses whose pod is gone (reclaimable)",
            m.pool_stale.clone(),
        );
        registry.register(
            "pool_reclaimed_addresses",
            "Addresses of stale attachments reclaimed (by ADDs on a full pool and by the agent)",
            m.pool_reclaimed.clone(),
        );
        registry.register(
            "cni_operations",
            "CNI operations by verb and outcome (ok or the CNI error code)",
            m.cni_ops.clone(),
        );
        registry.register(
            "cni_operation_duration_seconds",
            "Duration of CNI operations, as the plugin measured them",
            m.cni_duration.clone(),
        );
        registry.register(
            "agent_reconcile_duration_seconds",
            "Duration of the agent's reconcile passes",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "agent_reconcile_errors",
            "Reconcile problems by kind (counted when they appear or change)",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "agent_routes",
            "Routes to other nodes' pod CIDRs that the agent owns (protocol 201)",
            m.routes.clone(),
        );
        registry.register(
            "agent_firewall_heals",
            "Times the firewall state was found missing or changed and re-installed",
            m.firewall_heals.clone(),
        );
        registry.register(
            "agent_ready",
            "1 when the node's network is fully reconciled",
            m.ready.clone(),
        );
        registry.register(
            "agent_last_reconcile_timestamp_seconds",
            "When the last reconcile pass ended (Unix time)",
            m.last_reconcile.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// The pool's current state.
    pub fn pool(&self, pool: &Pool, report: &crate::attachment::Report) {
        let l = Net {
            network: pool.network.clone(),
        };
        self.pool_size
            .get_or_create(&l)
            .set(report.size.min(i64::MAX as u128) as i64);
        self.pool_used.get_or_create(&l).set(report.used as i64);
        self.pool_stale.get_or_create(&l).set(report.stale as i64);
    }

    /// Folds the operations the plugin appended to the pool's lock file since the last call.
    /// The file is emptied (under the lock) once it passes 1 MiB; an operation that ends in
    /// the instant between the last read and the truncation goes uncounted.
    pub fn fold_ops(&mut self, pool: &Pool) {
        let path = pool.dir().join("lock");
        let Ok(mut f) = std::fs::File::open(&path) else {
            return;
        };
        let off = self.offsets.get(&path).copied().unwrap_or(0);
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = if len < off { 0 } else { off };
        let mut text = String::new();
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.read_to_string(&mut text);
        }
        let mut consumed = start;
        for line in text.split_inclusive('\n') {
            if !line.ends_with('\n') {
                break; // being written
            }
            consumed += line.len() as u64;
            self.op(&pool.network, line.trim_end());
        }
        if consumed > 1 << 20
            && let Ok(store) = pool.open()
        {
            let mut rest = String::new();
            if f.seek(SeekFrom::Start(consumed)).is_ok() {
                let _ = f.read_to_string(&mut rest);
            }
            for line in rest.lines() {
                self.op(&pool.network, line);
            }
            crate::ipam::store::truncate_ops(&store);
            consumed = 0;
        }
        self.offsets.insert(path, consumed);
    }

    /// One line: `op v1 <verb> <outcome> <duration µs> <reclaimed>`.
    fn op(&self, network: &str, line: &str) {
        let f: Vec<&str> = line.split(' ').collect();
        let ["op", "v1", verb, outcome, us, reclaimed] = f.as_slice() else {
            return;
        };
        let (Ok(us), Ok(reclaimed)) = (us.parse::<u64>(), reclaimed.parse::<u64>()) else {
            return;
        };
        self.cni_ops
            .get_or_create(&Op {
                network: network.into(),
                verb: verb.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.cni_duration
            .get_or_create(&Verb {
                network: network.into(),
                verb: verb.to_string(),
            })
            .observe(us as f64 / 1e6);
        if reclaimed > 0 {
            self.pool_reclaimed
                .get_or_create(&Net {
                    network: network.into(),
                })
                .inc_by(reclaimed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_lines_become_counters_and_histograms() {
        let m = Metrics::new();
        m.op("n", "op v1 ADD ok 4200 2");
        m.op("n", "op v1 ADD 100 900 0");
        m.op("n", "garbage");
        let text = m.encode();
        assert!(
            text.contains(r#"pontoon_cni_operations_total{network="n",verb="ADD",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"outcome="100"} 1"#), "{text}");
        assert!(text.contains(r#"pontoon_pool_reclaimed_addresses_total{network="n"} 2"#));
        assert!(text.contains("pontoon_cni_operation_duration_seconds_count"));
    }
}
