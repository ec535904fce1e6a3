//! The two faces of the binary: the CNI plugin (when `CNI_COMMAND` is set) and the operator
//! command line (`pontoon masquerade ...`, `pontoon status`, ...).

use std::io::{Read, Write};
use std::time::Instant;

use clap::{Parser, Subcommand};
use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::cni::{self, Env};
use crate::error::{Error, Result};
use crate::masquerade::{self, RuleSet};
use crate::{logging, plugin};

/// Runs one CNI invocation: env + stdin in, result or error JSON on stdout. Returns the exit code.
pub fn cni_main() -> i32 {
    let started = Instant::now();
    let stdin = read_stdin();
    let (stdin, read_err) = match stdin {
        Ok(b) => (b, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    init_logging_from(&stdin);
    let (env, env_err) = match Env::from_lookup(|k| std::env::var(k).ok()) {
        Ok(e) => (Some(e), None),
        Err(e) => (None, Some(e)),
    };
    let result = match (read_err, env_err, &env) {
        (Some(e), _, _) | (None, Some(e), _) => Err(e),
        (None, None, Some(env)) => plugin::run(env, &stdin),
        (None, None, None) => unreachable!("either an env or its error"),
    };
    let (verb, cid, ifname) = match &env {
        Some(e) => (
            e.command.as_str(),
            e.container_id.as_str(),
            e.ifname.as_str(),
        ),
        None => ("?", "", ""),
    };
    let elapsed = started.elapsed();
    let mut out = std::io::stdout().lock();
    match result {
        Ok(reply) => {
            if let Some(v) = reply {
                let _ = writeln!(out, "{v}");
            }
            log::info!(
                "{verb} container={cid} ifname={ifname} outcome=ok duration_ms={:.3}",
                elapsed.as_secs_f64() * 1e3
            );
            0
        }
        Err(e) => {
            let v = cni::error_reply(&e, &plugin::reply_version(&stdin));
            let _ = writeln!(out, "{v}");
            log::warn!(
                "{verb} container={cid} ifname={ifname} outcome=error code={} duration_ms={:.3} msg={:?}",
                e.code(),
                elapsed.as_secs_f64() * 1e3,
                e.to_string()
            );
            1
        }
    }
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let limit = cni::config::MAX_STDIN as u64;
    std::io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("cannot read the network configuration from stdin", e))?;
    if buf.len() as u64 > limit {
        return Err(Error::Decode(format!(
            "stdin is larger than {} MiB; a network configuration is a few KiB",
            limit >> 20
        )));
    }
    Ok(buf)
}

fn init_logging_from(stdin: &[u8]) {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct LogKeys {
        #[serde(default)]
        log_file: Option<std::path::PathBuf>,
        #[serde(default)]
        log_level: Option<String>,
    }
    let k: LogKeys = serde_json::from_slice(stdin).unwrap_or_default();
    logging::init(k.log_file.as_deref(), k.log_level.as_deref());
}

#[derive(Parser)]
#[command(
    name = "pontoon",
    version,
    about = "pontoon: a bridge + host-local CNI plugin for Kubernetes nodes.\n\nRun by a container runtime with CNI_COMMAND set, it is a CNI plugin. Run by hand, it offers the operator commands below."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Egress SNAT rules for a pod network (one rule set per network, v4 and v6).
    Masquerade {
        #[command(subcommand)]
        action: MasqAction,
    },
}

#[derive(clap::Args)]
struct MasqArgs {
    /// The network name (as in the conflist's `name`).
    #[arg(long)]
    network: String,
    /// Pod CIDR(s) whose egress is masqueraded (repeat for dual stack).
    #[arg(long = "pod-cidr", required = true)]
    pod_cidrs: Vec<IpNetwork>,
    /// Extra destinations never masqueraded, e.g. the cluster pod CIDR or the service CIDR.
    #[arg(long = "no-masquerade")]
    no_masquerade: Vec<IpNetwork>,
    /// nftables or iptables (default: nftables when `nft` is installed).
    #[arg(long)]
    backend: Option<String>,
}

#[derive(Subcommand)]
enum MasqAction {
    /// Install (or update) the rules; does nothing when they are current.
    Ensure(MasqArgs),
    /// Exit 0 when the rules are installed and current, 1 otherwise.
    Check(MasqArgs),
    /// Remove the network's rules and nothing else.
    Remove {
        #[arg(long)]
        network: String,
        #[arg(long)]
        backend: Option<String>,
    },
}

/// The operator command line. Returns the exit code.
pub fn operator_main() -> i32 {
    logging::init(None, Some("info"));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run_operator(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pontoon: {e}");
            1
        }
    }
}

fn run_operator(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Masquerade { action } => match action {
            MasqAction::Ensure(a) => {
                let rs = RuleSet::new(&a.network, &a.pod_cidrs, &a.no_masquerade);
                let b = masquerade::backend(a.backend.as_deref())?;
                masquerade::ensure(b.as_ref(), &rs)?;
                let ips: Vec<_> = rs.sources.iter().map(|n| n.ip()).collect();
                masquerade::ensure_forwarding(&ips)?;
                println!(
                    "masquerade for network {} is in place ({}): from {} except to {}",
                    rs.network,
                    b.name(),
                    join(&rs.sources),
                    join(&rs.exclude)
                );
                Ok(0)
            }
            MasqAction::Check(a) => {
                let rs = RuleSet::new(&a.network, &a.pod_cidrs, &a.no_masquerade);
                let b = masquerade::backend(a.backend.as_deref())?;
                if b.is_current(&rs)? {
                    println!(
                        "masquerade for network {} is current ({})",
                        rs.network,
                        b.name()
                    );
                    Ok(0)
                } else {
                    println!(
                        "masquerade for network {} is missing or outdated ({})",
                        rs.network,
                        b.name()
                    );
                    Ok(1)
                }
            }
            MasqAction::Remove { network, backend } => {
                let b = masquerade::backend(backend.as_deref())?;
                b.remove(&network)?;
                println!("masquerade for network {network} removed ({})", b.name());
                Ok(0)
            }
        },
    }
}

fn join(v: &[IpNetwork]) -> String {
    v.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
