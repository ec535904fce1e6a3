//! The one error type of pontoon, and its mapping to CNI error codes.
//!
//! Every failure a runtime can see is an [`Error`]; [`Error::code`] gives the CNI code the spec
//! defines (1–11, 50/51) or one of pontoon's own (100+), and the message says what went wrong and,
//! where there is something to do, what to do.

use std::io;

/// pontoon's own error codes (the spec reserves 1–99).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// The address pool has no free address left.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// A requested address is taken, outside the pool, or otherwise refused.
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    /// The kernel refused a link, address or route change.
    pub const NETLINK: u32 = 102;
    /// The pod network namespace cannot be used.
    pub const NETNS: u32 = 103;
    /// Firewall (masquerade) rules could not be installed or read.
    pub const FIREWALL: u32 = 104;
    /// CHECK found the attachment differs from what ADD made.
    pub const CHECK_FAILED: u32 = 105;
    /// A delegated IPAM plugin failed.
    pub const DELEGATE: u32 = 106;
    /// An invariant broke inside pontoon (a bug): please report it.
    pub const INTERNAL: u32 = 199;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("incompatible CNI version {version:?}: pontoon supports {supported}")]
    IncompatibleVersion { version: String, supported: String },

    #[error("unsupported field {key}: {msg}")]
    UnsupportedField { key: String, msg: String },

    #[error("invalid environment variable {var}: {msg}")]
    InvalidEnv { var: &'static str, msg: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot decode the network configuration: {0}")]
    Decode(String),

    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),

    #[error("{0}")]
    TryAgainLater(String),

    #[error("{0}")]
    NotAvailable(String),

    #[error("{0}")]
    PoolExhausted(String),

    #[error("{0}")]
    AddressUnavailable(String),

    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Netns(String),

    #[error("{0}")]
    Firewall(String),

    #[error("CHECK failed: {0}")]
    CheckFailed(String),

    #[error("{0}")]
    Delegate(String, u32),

    #[error("internal error (please report): {0}")]
    Internal(String),

    /// Several failures of one best-effort teardown, reported with the first one's code.
    #[error("{msg}")]
    Multiple { msg: String, code: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        use code::*;
        match self {
            Error::IncompatibleVersion { .. } => INCOMPATIBLE_VERSION,
            Error::UnsupportedField { .. } => UNSUPPORTED_FIELD,
            Error::InvalidEnv { .. } => INVALID_ENV,
            Error::Io { .. } => IO,
            Error::Decode(_) => DECODE,
            Error::InvalidConfig(_) => INVALID_CONFIG,
            Error::TryAgainLater(_) => TRY_AGAIN_LATER,
            Error::NotAvailable(_) => NOT_AVAILABLE,
            Error::PoolExhausted(_) => POOL_EXHAUSTED,
            Error::AddressUnavailable(_) => ADDRESS_UNAVAILABLE,
            Error::Netlink { .. } => NETLINK,
            Error::Netns(_) => NETNS,
            Error::Firewall(_) => FIREWALL,
            Error::CheckFailed(_) => CHECK_FAILED,
            Error::Delegate(_, c) => *c,
            Error::Internal(_) => INTERNAL,
            Error::Multiple { code, .. } => *code,
        }
    }

    /// Extra detail for the CNI error's `details` field (the underlying OS error, if any).
    pub fn details(&self) -> String {
        match self {
            Error::Io { source, .. } | Error::Netlink { source, .. } => match source.raw_os_error()
            {
                Some(errno) => format!("errno {errno}"),
                None => String::new(),
            },
            _ => String::new(),
        }
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn netlink(context: impl Into<String>, source: io::Error) -> Self {
        Error::Netlink {
            context: context.into(),
            source,
        }
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Error::InvalidConfig(msg.into())
    }

    pub fn env(var: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidEnv {
            var,
            msg: msg.into(),
        }
    }

    /// The errno behind this error, when it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Collects errors during best-effort teardown (DEL, GC, rollback), so cleanup continues past
/// the first failure and the caller still learns about every one.
#[derive(Debug, Default)]
pub struct ErrorList(Vec<Error>);

impl ErrorList {
    pub fn push(&mut self, e: Error) {
        log::warn!("{e}");
        self.0.push(e);
    }

    /// Records the error of `r`, if any.
    pub fn check<T>(&mut self, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    /// Ok when nothing failed; otherwise the first error, with the others appended to its message.
    pub fn into_result(mut self) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        if self.0.len() == 1 {
            return Err(self.0.remove(0));
        }
        let first = self.0.remove(0);
        let code = first.code();
        let rest: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        let msg = format!("{first}; also: {}", rest.join("; "));
        Err(Error::Multiple { msg, code })
    }
}
