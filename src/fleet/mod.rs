//! Fleet mode (DESIGN §5a): the registry and policies on etcd.
//!
//! Owns the key layout ([`keys`]), the store seam ([`store`], with a real etcd
//! adapter in [`etcd`] behind the Cargo feature `etcd` and an in-memory store in
//! [`mem`] for tests), the per-entry validation of remote documents and the merge
//! with local files ([`view`]), the sync engine that keeps a remote view
//! ([`sync`]), its on-disk cache ([`cache`]), the publisher of this host's
//! entries and status ([`publish`]), and the operator side: policy sets, pushes,
//! node removal, fleet status ([`admin`]).
//!
//! Must not: touch the kernel, read the local files itself (the daemon hands it
//! its validated registry), or turn any store error into an empty view.

pub mod cache;
pub mod doc;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod keys;
pub mod mem;
pub mod store;
pub mod sync;
pub mod view;

#[cfg(test)]
mod tests;
