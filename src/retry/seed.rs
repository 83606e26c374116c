//! Stable hashing of message ids, so that jitter agrees across processes.

/// A stable 64-bit hash of a message id (or, without one, of its body), the same on every
/// platform and Rust version (unlike `std`'s hasher), so that jitter agrees across processes
/// running the same release.
///
/// Eight bytes at a time: one multiply per word, then [`mix`]. It runs on the engine's loop for
/// every message without an id, over its whole body: FNV-1a, one dependent multiply per byte,
/// took about 100 ns of the loop's time for an 80-byte body (docs/performance.md, rounds 11
/// and 12). The values changed with it (0.2): jitter is a pure function of the seed and the
/// attempt within a release, and nothing keeps a seed across releases.
pub(crate) fn seed_of(id: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (id.len() as u64).wrapping_mul(K);
    let mut words = id.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K);
        h ^= h >> 29;
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    mix(h)
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
        // Within a release the seed must not change (processes agree on jitter): these values
        // change only with a release that says so.
        assert_eq!(seed_of(b""), SEED_EMPTY);
        assert_eq!(seed_of(b"a"), SEED_A);
        assert_eq!(seed_of(b"payment-5577006791947779410"), SEED_ID);
    }

    const SEED_EMPTY: u64 = 0xf52a_15e9_a9b5_e89b;
    const SEED_A: u64 = 0x81c1_7171_6e97_eff8;
    const SEED_ID: u64 = 0xcda8_ded7_c97f_7ce3;

    #[test]
    fn every_byte_and_the_length_count() {
        // A byte changed anywhere, in a whole word or the tail, or a zero byte added, gives
        // another seed.
        let body = br#"{"id":5577006791947779410,"clientId":5,"amount":1250,"currency":"EUR"}"#;
        let seed = seed_of(body);
        for i in 0..body.len() {
            let mut other = body.to_vec();
            other[i] ^= 1;
            assert_ne!(seed_of(&other), seed, "byte {i}");
        }
        let mut longer = body.to_vec();
        longer.push(0);
        assert_ne!(seed_of(&longer), seed);
        assert_ne!(seed_of(b"\0"), seed_of(b""));
        assert_ne!(seed_of(&[0; 8]), seed_of(&[0; 16]));
    }

    #[test]
    fn seeds_of_similar_bodies_spread_over_the_jitter_range() {
        // Bodies that differ in one counter: their jitter fractions fall in each tenth of
        // [0, 1) about as often (1 000 bodies, each tenth 100 ± 40).
        let mut tenths = [0u32; 10];
        for i in 0..1000u32 {
            let body = format!(r#"{{"clientId":{i},"seq":7}}"#);
            let x = unit_interval(mix(seed_of(body.as_bytes())));
            tenths[(x * 10.0) as usize] += 1;
        }
        assert!(tenths.iter().all(|n| (60..=140).contains(n)), "{tenths:?}");
    }
}
