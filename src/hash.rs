//! The fast hasher of the maps compile and the loader's cross-file checks
//! build on every change (SipHash costs more than the rest of a lookup there).

use std::collections::HashMap;

/// A small, fast hasher for internal maps (keys are label strings, names,
/// addresses, identities and rule lists from the inputs; none is iterated for
/// output). The multiply-rotate scheme of rustc's FxHasher.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(pub(crate) u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        for b in chunks.remainder() {
            self.add(u64::from(*b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        // A multiply carries a difference only upwards: keys that differ in
        // the high bytes of their last word (the host part of an IPv6
        // address) would differ only in the high bits, and a table indexes
        // by the low ones and tags by the top seven. The finalizer of
        // MurmurHash3 (fmix64) spreads every bit over all of them.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

impl FastHasher {
    #[inline]
    pub fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// For randomized tests: a xorshift64 generator from `seed` (not zero),
/// each call a number below its argument. Deterministic, so a failure
/// repeats.
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;
    use std::net::{IpAddr, Ipv6Addr};

    /// Keys that differ only in their last bytes (IPv6 host parts, as a fleet
    /// registry's addresses do) spread over the low bits a table indexes by
    /// and the top seven it tags by, as a random hash would.
    #[test]
    fn addresses_differing_in_their_last_bytes_spread_over_every_bit() {
        let b = std::hash::BuildHasherDefault::<FastHasher>::default();
        let hashes: Vec<u64> = (0..4096u128)
            .map(|i| b.hash_one(IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | i))))
            .collect();
        let low: HashSet<u64> = hashes.iter().map(|h| h & 0xfff).collect();
        let top: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        // 4096 random draws from 4096 values give about 2589 distinct ones.
        assert!(low.len() > 2400, "{} distinct low 12-bit values", low.len());
        assert_eq!(top.len(), 128, "every top 7-bit tag is used");
    }
}
