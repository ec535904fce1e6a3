//! pontoon: a CNI plugin for Kubernetes nodes: a Linux bridge, a veth pair per pod, an
//! in-process host-local-compatible address pool, and per-network masquerade.

pub mod agent;
pub mod attachment;
pub mod cli;
pub mod cni;
pub mod dataplane;
pub mod error;
pub mod firewall;
pub mod install;
pub mod ipam;
pub mod logging;
pub mod loopback;
pub mod macspoof;
pub mod masquerade;
pub mod netns;
pub mod nft;
pub mod plugin;
pub mod policy;
pub mod portmap;
pub mod reaper;
