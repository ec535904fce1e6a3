//! A network's firewall state as a whole: its masquerade rule set and its hostPort objects with
//! every mapping the attachment records hold. Checked by content (the kernel's rules compared
//! with the rules pontoon would write, on one dump) and, when anything differs or is missing
//! (a flushed ruleset, a firewall reload, a hand edit), re-installed from the records in one
//! transaction under the pool lock: ADD, CHECK, the agent and `pontoon firewall reload` all
//! heal the same way.

use ipnetwork::IpNetwork;

use crate::cni::NetConf;
use crate::error::{Error, Result};
use crate::ipam::store::{Store, Stored};
use crate::ipam::{self, Pool};
use crate::macspoof;
use crate::masquerade::nftables::{self as masq_nft, TABLE};
use crate::masquerade::{self, Backend, RuleSet};
use crate::nft::{self, Batch, Chain, Conn, NFPROTO_INET};
use crate::portmap::{Element, HostPorts};

/// How a network masquerades.
pub enum Masq {
    /// In pontoon's nftables table: part of the one dump and the one transaction.
    Nft(RuleSet),
    /// With another backend (iptables), checked and applied on its own.
    Other(Box<dyn Backend>, RuleSet),
}

/// The firewall state one network needs.
pub struct Network<'a> {
    pub network: String,
    pub masq: Option<Masq>,
    pub hostports: Option<HostPorts<'a>>,
    /// `macspoofchk`: the records' MAC spoof checks belong to the state.
    pub macspoof: bool,
    /// The pool whose records hold the hostPort mappings.
    pub pool: Option<Pool>,
}

impl<'a> Network<'a> {
    /// The state of the network of `conf`: masquerade with `ipMasq`, hostPort objects when the
    /// conflist declares `portMappings` (or this ADD brings mappings) and the pool is
    /// in-process. `addrs` are the addresses of a delegated IPAM (their subnets are masqueraded).
    pub fn of(conf: &'a NetConf, addrs: &[IpNetwork]) -> Result<Network<'a>> {
        let pool =
            match (conf.ipam_type(), &conf.raw.ipam) {
                (Some(t), Some(v)) if ipam::IN_PROCESS_TYPES.contains(&t) => Some(
                    Pool::from_config(&conf.name, v, conf.raw.runtime_config.ip_ranges.as_ref())?,
                ),
                _ => None,
            };
        let masq = if conf.raw.ip_masq {
            let rs = masquerade::rule_set_for(conf, addrs)?;
            let b = masquerade::backend(conf.raw.ip_masq_backend.as_deref())?;
            Some(if b.name() == "nftables" {
                Masq::Nft(rs)
            } else {
                Masq::Other(b, rs)
            })
        } else {
            None
        };
        let hostports = match &pool {
            Some(p)
                if conf.has_capability("portMappings")
                    || !conf.raw.runtime_config.port_mappings.is_empty() =>
            {
                Some(HostPorts {
                    network: &conf.name,
                    bridge: conf.bridge_name(),
                    subnets: p.subnets(),
                })
            }
            _ => None,
        };
        Ok(Network {
            network: conf.name.clone(),
            masq,
            hostports,
            macspoof: conf.raw.macspoofchk && pool.is_some(),
            pool,
        })
    }

    /// Whether the network has any firewall state (an ADD of a network with none pays nothing).
    pub fn is_empty(&self) -> bool {
        self.masq.is_none() && self.hostports.is_none() && !self.macspoof
    }

    /// The chains of pontoon's table this network needs.
    fn nft_chains(&self) -> Vec<Chain> {
        let mut out = Vec::new();
        if let Some(Masq::Nft(rs)) = &self.masq {
            out.extend(masq_nft::chains(rs));
        }
        if let Some(hp) = &self.hostports {
            out.extend(hp.objects().1);
        }
        out
    }

    /// The chains whose rules differ from what pontoon would write (one dump).
    fn differing_chains(&self, conn: &mut Conn) -> Result<Vec<String>> {
        let want = self.nft_chains();
        if want.is_empty() {
            return Ok(vec![]);
        }
        Ok(match conn.rules(NFPROTO_INET, TABLE)? {
            Some(have) => nft::differing(&want, &have),
            None => want.into_iter().map(|c| c.name).collect(),
        })
    }

    /// ADD's step: makes sure the state is in place, at the cost of one netlink round trip when
    /// it is; re-installs all of it from the records when it is not. Returns whether it healed.
    pub fn ensure(&self) -> Result<bool> {
        let mut healed = false;
        if let Some(hp) = &self.hostports {
            hp.ensure_route_localnet()?;
        }
        if !self.nft_chains().is_empty() {
            let mut conn = Conn::new()?;
            let bad = self.differing_chains(&mut conn)?;
            if !bad.is_empty() {
                log::warn!(
                    "the firewall state of network {} is missing or changed ({}): \
                     re-installing it from the records",
                    self.network,
                    bad.join(", ")
                );
                self.heal()?;
                healed = true;
            }
        }
        if let Some(Masq::Other(b, rs)) = &self.masq
            && !b.is_current(rs)?
        {
            log::info!(
                "installing masquerade rules for network {} with {}",
                rs.network,
                b.name()
            );
            b.apply(rs)?;
            healed = true;
        }
        Ok(healed)
    }

    /// Re-installs the whole state: the masquerade rules, the hostPort objects and every
    /// recorded mapping, in one transaction, under the pool lock (so no ADD or DEL changes a
    /// mapping meanwhile). The socket is closed after the lock is released.
    pub fn heal(&self) -> Result<()> {
        let mut conn = Conn::new()?;
        match &self.pool {
            Some(p) if self.hostports.is_some() || self.macspoof => {
                let store = p.open()?;
                self.heal_locked(&store, &mut conn)?;
            }
            _ => {
                let mut b = Batch::new();
                if let Some(Masq::Nft(rs)) = &self.masq {
                    masq_nft::install(&mut b, rs);
                }
                conn.commit(&b)?;
            }
        }
        if let Some(Masq::Other(b, rs)) = &self.masq {
            b.apply(rs)?;
        }
        Ok(())
    }

    /// [`Network::heal`] with the pool already locked.
    pub fn heal_locked(&self, store: &Store, conn: &mut Conn) -> Result<()> {
        let mut b = Batch::new();
        if let Some(Masq::Nft(rs)) = &self.masq {
            masq_nft::install(&mut b, rs);
        }
        if let Some(hp) = &self.hostports {
            hp.install(&mut b, &recorded_mappings(store)?);
        }
        if self.macspoof {
            for (veth, mac) in recorded_spoof_checks(store)? {
                macspoof::add(&mut b, &veth, &mac);
            }
        }
        conn.commit(&b)?;
        if let Some(hp) = &self.hostports {
            hp.ensure_route_localnet()?;
        }
        Ok(())
    }

    /// CHECK's step: the rules and the attachment's mappings must be in place. What is missing
    /// is re-installed at once, and CHECK still fails (code 105) saying so, so the runtime
    /// learns of it; the next CHECK passes.
    pub fn check(&self, mappings: &[Element]) -> Result<()> {
        let mut conn = Conn::new()?;
        let mut problem = self.differing_chains(&mut conn)?.join(", ");
        if problem.is_empty()
            && let Some(hp) = &self.hostports
            && let Err(e) = hp.check(&mut conn, mappings)
        {
            problem = e.to_string();
        }
        if let Some(Masq::Other(b, rs)) = &self.masq
            && !b.is_current(rs)?
        {
            problem = format!("the {} masquerade rules", b.name());
        }
        if problem.is_empty() {
            return Ok(());
        }
        self.heal()?;
        Err(Error::CheckFailed(format!(
            "the firewall state of network {} was missing or changed ({problem}); it has been \
             re-installed from the records",
            self.network
        )))
    }

    /// The agent's full check: the rules, and the maps' elements against every record. Heals
    /// when anything differs; returns whether it did.
    pub fn reconcile(&self) -> Result<bool> {
        let mut conn = Conn::new()?;
        let mut bad = !self.differing_chains(&mut conn)?.is_empty();
        if !bad && let (Some(hp), Some(p)) = (&self.hostports, &self.pool) {
            // Read without the lock: a mismatch from an ADD or DEL in flight only costs a heal,
            // which takes the lock and reads the records again.
            let store = Store::unlocked(&p.data_dir, &p.network);
            bad = !hp.elements_match(&mut conn, &recorded_mappings(&store)?)?;
        }
        if !bad
            && self.macspoof
            && let Some(p) = &self.pool
        {
            let store = Store::unlocked(&p.data_dir, &p.network);
            for (veth, mac) in recorded_spoof_checks(&store)? {
                if !macspoof::is_current(&mut conn, &veth, &mac)? {
                    bad = true;
                    break;
                }
            }
        }
        if let Some(Masq::Other(b, rs)) = &self.masq {
            bad |= !b.is_current(rs)?;
        }
        drop(conn);
        if bad {
            log::warn!(
                "the firewall state of network {} differs from its records: re-installing it",
                self.network
            );
            self.heal()?;
        }
        Ok(bad)
    }
}

/// Every MAC spoof check the network's records hold: (host veth, the pod's MAC).
pub fn recorded_spoof_checks(store: &Store) -> Result<Vec<(String, [u8; 6])>> {
    Ok(store
        .records()?
        .into_iter()
        .filter_map(|(_, r)| match r {
            Stored::Ok(r) => {
                let mac = r.port?.mac_spoof_check?;
                Some((r.host_veth?, crate::cni::config::parse_mac(&mac)?))
            }
            _ => None,
        })
        .collect())
}

/// Every hostPort mapping the network's records hold.
pub fn recorded_mappings(store: &Store) -> Result<Vec<Element>> {
    Ok(store
        .records()?
        .into_iter()
        .filter_map(|(_, r)| match r {
            Stored::Ok(r) => Some(r.port_mappings),
            _ => None,
        })
        .flatten()
        .collect())
}
