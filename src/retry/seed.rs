//! Stable hashing of message ids, so that jitter agrees across processes.

/// A stable 64-bit hash of a message id (FNV-1a), the same on every platform and Rust version
/// (unlike `std`'s hasher), so that jitter agrees across processes.
pub(crate) fn seed_of(id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64 finaliser: spreads the bits of `x`.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maps 64 random bits to `[0, 1)`.
pub(crate) fn unit_interval(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_stable() {
        // FNV-1a test vectors: the seed must never change between releases.
        assert_eq!(seed_of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(seed_of(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
