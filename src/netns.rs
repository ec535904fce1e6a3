//! Network namespace handles.
//!
//! `setns(2)` changes only the calling thread. pontoon never moves its main thread: work that
//! must happen inside a pod namespace (opening sockets bound to it, writing its `/proc/sys/net`)
//! runs in [`NetNs::run`], on a short-lived scoped thread that enters the namespace and is
//! thrown away afterwards, so no thread ever returns to other work in the wrong namespace (the
//! Go reference's `ns.Do` model). Sockets opened there stay bound to the pod namespace and are
//! then driven from the main thread.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, PROC_SUPER_MAGIC, fstatfs};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens a network namespace by path (`/var/run/netns/x` or `/proc/<pid>/ns/net`). A path
    /// that is missing gives `Ok(None)`; one that is not a namespace is an error.
    pub fn open(path: &Path) -> Result<Option<NetNs>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Netns(format!(
                    "cannot open network namespace {}: {e}",
                    path.display()
                )));
            }
        };
        let fs = fstatfs(&file)
            .map_err(|e| Error::Netns(format!("cannot stat {}: {e}", path.display())))?;
        let magic = fs.filesystem_type();
        if magic != NSFS_MAGIC && magic != PROC_SUPER_MAGIC {
            return Err(Error::Netns(format!(
                "{} is not a network namespace (wrong filesystem type {:#x}); CNI_NETNS must \
                 name a netns such as /var/run/netns/<name> or /proc/<pid>/ns/net",
                path.display(),
                magic.0
            )));
        }
        Ok(Some(NetNs {
            file,
            path: path.to_path_buf(),
        }))
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<NetNs> {
        let p = PathBuf::from("/proc/thread-self/ns/net");
        NetNs::open(&p)?.ok_or_else(|| Error::Netns("/proc/thread-self/ns/net is missing".into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// (device, inode): two handles name the same namespace iff these are equal.
    pub fn id(&self) -> Result<(u64, u64)> {
        let st = nix::sys::stat::fstat(&self.file)
            .map_err(|e| Error::Netns(format!("cannot stat {}: {e}", self.path.display())))?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its value. The calling
    /// thread never changes namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.file.as_fd();
        let path = self.path.display().to_string();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::Netns(format!("cannot enter network namespace {path}: {e}"))
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("a namespace worker thread panicked".into())))
        })
    }
}
