//! Gratuitous ARP and unsolicited IPv6 neighbour advertisements from the pod interface, so that
//! neighbours caching the previous owner of a recycled address learn the new MAC at once (the
//! reference relies on `arp_notify`, which leaves ~10 s blackouts: containernetworking/plugins
//! #858). The sockets are opened inside the pod namespace and used from the main thread.
#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};

const ETH_P_ARP: u16 = 0x0806;

pub struct Announcer {
    packet: Option<OwnedFd>,
    icmp6: Vec<(Ipv6Addr, OwnedFd)>,
}

fn last_os(what: &str) -> Error {
    Error::netlink(what.to_string(), std::io::Error::last_os_error())
}

fn socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(last_os("cannot open an announcement socket"));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Announcer {
    /// Opens the sockets; must run inside the pod namespace. IPv6 sockets are bound to the
    /// addresses they announce, so those must already be on the interface.
    pub fn open(ips: &[IpAddr]) -> Result<Announcer> {
        let packet = if ips.iter().any(IpAddr::is_ipv4) {
            Some(socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                ETH_P_ARP.to_be() as i32,
            )?)
        } else {
            None
        };
        let mut icmp6 = Vec::new();
        for ip in ips {
            let IpAddr::V6(v6) = ip else { continue };
            let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
            let hops: libc::c_int = 255;
            // SAFETY: valid fd, pointer to a c_int of the right size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_HOPS,
                    &hops as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as u16;
            sa.sin6_addr.s6_addr = v6.octets();
            // SAFETY: sa is a valid sockaddr_in6.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sa as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            };
            if rc != 0 {
                // Tentative (DAD on) or otherwise unusable as a source: skip announcing it.
                log::debug!("not announcing {v6}: {}", std::io::Error::last_os_error());
                continue;
            }
            icmp6.push((*v6, fd));
        }
        Ok(Announcer { packet, icmp6 })
    }

    /// Sends one announcement per address out of interface `ifindex` (best effort: a failure is
    /// logged, never fatal).
    pub fn announce(&self, ifindex: u32, mac: &[u8], ips: &[IpAddr]) {
        for ip in ips {
            let r = match ip {
                IpAddr::V4(v4) => self.garp(ifindex, mac, *v4),
                IpAddr::V6(v6) => self.unsolicited_na(ifindex, mac, *v6),
            };
            if let Err(e) = r {
                log::warn!("could not announce {ip}: {e}");
            }
        }
    }

    fn garp(&self, ifindex: u32, mac: &[u8], ip: Ipv4Addr) -> Result<()> {
        let Some(fd) = &self.packet else {
            return Ok(());
        };
        let mut pkt = [0u8; 28];
        pkt[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        pkt[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        pkt[4] = 6;
        pkt[5] = 4;
        pkt[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
        pkt[8..14].copy_from_slice(&mac[..6]);
        pkt[14..18].copy_from_slice(&ip.octets());
        pkt[24..28].copy_from_slice(&ip.octets());
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETH_P_ARP.to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: valid fd, buffer and sockaddr_ll.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_os("cannot send gratuitous ARP"));
        }
        Ok(())
    }

    fn unsolicited_na(&self, ifindex: u32, mac: &[u8], ip: Ipv6Addr) -> Result<()> {
        let Some((_, fd)) = self.icmp6.iter().find(|(a, _)| *a == ip) else {
            return Ok(());
        };
        let mut pkt = [0u8; 32];
        pkt[0] = 136; // neighbour advertisement
        pkt[4] = 0x20; // override flag; not solicited, not router
        pkt[8..24].copy_from_slice(&ip.octets());
        pkt[24] = 2; // target link-layer address option
        pkt[25] = 1; // 8 bytes
        pkt[26..32].copy_from_slice(&mac[..6]);
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as u16;
        sa.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
        sa.sin6_scope_id = ifindex;
        let idx = ifindex as libc::c_int;
        // SAFETY: valid fd and buffers of the sizes given. The kernel fills the ICMPv6 checksum.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_IF,
                &idx as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in6>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_os("cannot send neighbour advertisement"));
        }
        Ok(())
    }
}
