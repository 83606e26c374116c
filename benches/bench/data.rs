//! The messages (payments and client registrations) and the race's deterministic data.

use std::time::Duration;

use serde::Deserialize;

/// Body size of every payment, as in the reference numbers (80-byte persistent messages).
pub const BODY_BYTES: usize = 80;
/// Body size of the payments of the large-body race (held memory per message).
pub const BIG_BODY_BYTES: usize = 1024;

/// A payment: what the consumer decodes of a payment body.
#[derive(Deserialize)]
pub struct Payment {
    pub id: u64,
    pub client: u64,
}

/// A client registration: its key.
#[derive(Deserialize)]
pub struct Client {
    pub id: u64,
}

/// A payment body of exactly `bytes` bytes (padded with a memo the consumer ignores), or just
/// the JSON when that is longer.
pub fn payment_body(id: u64, client: u64, bytes: usize) -> Vec<u8> {
    let mut s = format!(r#"{{"id":{id},"client":{client},"memo":""#);
    let pad = bytes.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s.into_bytes()
}

/// A client registration body.
pub fn client_body(id: u64) -> Vec<u8> {
    format!(r#"{{"id":{id}}}"#).into_bytes()
}

/// A small deterministic generator (splitmix64): the race data is the same in every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The race: which client each payment needs, and when (after the payments) each client's
/// registration is published.
pub struct RaceData {
    pub client_of: Vec<u64>,
    pub reg_at: Vec<Duration>,
}

impl RaceData {
    /// `n` payments over `k` clients, registrations within `0..t`, from `seed`.
    pub fn new(n: usize, k: u64, t: Duration, seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        let client_of = (0..n).map(|_| rng.below(k)).collect();
        let t_us = t.as_micros().max(1) as u64;
        let reg_at = (0..k)
            .map(|_| Duration::from_micros(rng.below(t_us)))
            .collect();
        Self { client_of, reg_at }
    }
}
