//! [`DatapathError`]: every way a [`Datapath`](super::Datapath) call fails, with
//! structured fields. A failed kernel or libbpf call keeps its cause as the
//! error's `source` (the `io::Error` with its errno, or the `libbpf_rs::Error`
//! with its kind), so callers classify by kind, never by text; the message says
//! only what failed, and `{:#}` (anyhow) prints the cause after it, once.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The state does not fit a map; nothing was changed.
    #[error("{map} needs {needed} entries but holds at most {max}; the running state was kept")]
    Capacity {
        map: &'static str,
        needed: usize,
        max: usize,
    },
    /// An attachment names an endpoint slot the compiled state does not have.
    #[error(
        "attachment of ifindex {ifindex} names endpoint slot {slot} but the state has {endpoints} endpoints"
    )]
    UnknownSlot {
        ifindex: u32,
        slot: u32,
        endpoints: usize,
    },
    /// A system call failed; `source.raw_os_error()` is its errno.
    #[error("{op}")]
    Kernel {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// A libbpf call failed; `source.kind()` classifies its errno
    /// (`NotFound`, `TooBig` for E2BIG, `OutOfMemory`, ...).
    #[error("{op}")]
    Libbpf {
        op: String,
        #[source]
        source: libbpf_rs::Error,
    },
    /// `pin_dir` does not live on a bpf filesystem (and none could be mounted).
    #[error(
        "{}: not a bpf filesystem (pin_dir {} must live on bpffs; mount -t bpf bpf {})",
        dir.display(),
        pin_dir.display(),
        dir.display()
    )]
    NotBpffs { dir: PathBuf, pin_dir: PathBuf },
    /// A map's key or value size is not the layout this build was made for.
    #[error("{map}: key/value sizes {key}/{value} but this build expects {want_key}/{want_value}")]
    MapLayout {
        map: &'static str,
        key: u32,
        value: u32,
        want_key: usize,
        want_value: usize,
    },
    /// The pinned maps carry another layout version.
    #[error(
        "{}: pinned maps have layout version {found}, this netpol supports {supported}; detach the old instance first",
        maps_dir.display()
    )]
    LayoutVersion {
        maps_dir: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A value read from a map has another size than its layout.
    #[error("{map}: value of {len} bytes, expected {expected}")]
    ValueSize {
        map: &'static str,
        len: usize,
        expected: usize,
    },
    /// `netpol_state_v1` has no entry 0 (it always has one once created).
    #[error("netpol_state_v1 has no entry 0")]
    NoState,
    /// The bpf object was built without its load-time settings (`.rodata`).
    #[error("bpf object has no .rodata")]
    NoSettings,
    /// The thread waiting for the grace period after a flip panicked.
    #[error("the grace-period wait (netpol_barrier_v1) panicked")]
    BarrierPanicked,
    /// A pin path the kernel cannot take.
    #[error("{}: path contains a NUL byte", path.display())]
    NulInPath { path: PathBuf },
    /// A failure the in-memory test datapath was told to produce
    /// ([`FakeDatapath::fail_next_apply`](super::fake::FakeDatapath::fail_next_apply)).
    #[error("{message}")]
    Injected { message: String },
}

impl DatapathError {
    /// The kernel refused to create a map of the requested size: E2BIG (more
    /// entries than its type allows) or ENOMEM (it cannot be allocated).
    pub fn map_size_refused(&self) -> bool {
        match self {
            DatapathError::Libbpf { source, .. } => matches!(
                source.kind(),
                libbpf_rs::ErrorKind::TooBig | libbpf_rs::ErrorKind::OutOfMemory
            ),
            DatapathError::Kernel { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libbpf(errno: i32) -> DatapathError {
        DatapathError::Libbpf {
            op: "load the bpf programs".into(),
            source: libbpf_rs::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn the_cause_is_printed_once() {
        let e = libbpf(libc::E2BIG);
        assert_eq!(e.to_string(), "load the bpf programs");
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            "load the bpf programs: Argument list too long (os error 7)"
        );
        let e = DatapathError::Kernel {
            op: "pin /sys/fs/bpf/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            "pin /sys/fs/bpf/x: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn map_size_refusals_are_told_by_errno() {
        assert!(libbpf(libc::E2BIG).map_size_refused());
        assert!(libbpf(libc::ENOMEM).map_size_refused());
        assert!(!libbpf(libc::EPERM).map_size_refused());
        assert!(!libbpf(libc::EINVAL).map_size_refused());
        let kernel = |errno| DatapathError::Kernel {
            op: "create map".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(kernel(libc::E2BIG).map_size_refused());
        assert!(kernel(libc::ENOMEM).map_size_refused());
        assert!(!kernel(libc::ENODEV).map_size_refused());
        let capacity = DatapathError::Capacity {
            map: "policy map (policy_max_entries)",
            needed: 2,
            max: 1,
        };
        assert!(!capacity.map_size_refused());
    }
}
