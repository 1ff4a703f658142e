//! Maps keyed by numbers that are already well spread or handed out by us (packed ids,
//! hashes computed once): hashed by one multiply instead of SipHash.

use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by packed ids (`site << 32 | identity`) or precomputed hashes, hashed by
/// one multiply.
///
/// SipHash was a tenth of a decision; ids are handed out here, never chosen by a
/// client, so a keyed hash buys nothing for these keys.
pub type IdMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<IdHasher>>;

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }

    fn write_u64(&mut self, x: u64) {
        // Fold the high half of the product down: the table indexes by the low bits,
        // which a multiply alone leaves depending only on the key's low bits (the identity).
        let h = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hash_spreads_sites_with_the_same_identity() {
        let hash = |k: u64| {
            let mut h = IdHasher::default();
            h.write_u64(k);
            h.finish()
        };
        // 4096 sites × one identity: the low 12 bits (a 4096-bucket table) must differ.
        let buckets: std::collections::HashSet<u64> =
            (0..4096u64).map(|s| hash(s << 32 | 7) & 0xFFF).collect();
        assert!(buckets.len() > 2048, "{} distinct buckets", buckets.len());
        let mut m: IdMap<u32> = IdMap::default();
        for k in 0..1000u64 {
            m.insert(k << 32 | 1, k as u32);
        }
        assert_eq!(m.get(&(999 << 32 | 1)), Some(&999));
        assert_eq!(m.get(&(999 << 32 | 2)), None);
    }
}
