//! Message headers: the names prereq reads and writes, tolerant decoding, and the header tables
//! of deferred and dead-lettered copies.
//!
//! Decoding never fails and never panics: an integer header may arrive in any AMQP integer width
//! (Go `int32` → `LongInt`, Java `Long` → `LongLongInt`, `Short` → `ShortInt`, …) or as an
//! integer string; all are widened to `i64`. Negative values, non-integer strings, booleans,
//! tables and arrays are treated as absent.
//!
//! `x-delay` is written (for the delayed-message exchange) but never read back: the broker and
//! some clients return it negated or reinterpreted, so the next delay always comes from the
//! attempt count.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::DeadLetter;

/// prereq's own attempt counter: how many times the message was deferred.
pub const ATTEMPT: &str = "x-prereq-attempt";
/// When prereq first saw the message, in milliseconds since the Unix epoch.
pub const FIRST_SEEN: &str = "x-prereq-first-seen";
/// The exchange the message was first published to (before any deferral).
pub const ORIGINAL_EXCHANGE: &str = "x-prereq-original-exchange";
/// The routing key the message was first published with (before any deferral).
pub const ORIGINAL_ROUTING_KEY: &str = "x-prereq-original-routing-key";
/// Dead letters: the class of the reason (`undecodable`, `rejected`, `key-never-arrived`,
/// `retries-exhausted`).
pub const DEAD_LETTER_KIND: &str = "x-prereq-dead-letter-kind";
/// Dead letters: the readable reason.
pub const DEAD_LETTER_REASON: &str = "x-prereq-dead-letter-reason";
/// Dead letters: how many times the message had been deferred.
pub const ATTEMPTS: &str = "x-prereq-attempts";
/// Dead letters: the last error seen for the message (the seam carries one text per decision,
/// so this is the dead-letter reason's text).
pub const LAST_ERROR: &str = "x-prereq-last-error";
/// Dead letters: when the message was dead-lettered, in milliseconds since the Unix epoch.
pub const DEAD_LETTERED_AT: &str = "x-prereq-dead-lettered-at";
/// The original payment demo's attempt counter (attempts so far); read and written.
pub const RETRY: &str = "x-retry";
/// The original payment demo's per-message limit on attempts; read, maps to
/// [`crate::transport::Delivery::max_attempts`].
pub const RETRY_LIMIT: &str = "x-retry-limit";
/// The delayed-message exchange's delay in milliseconds; written, never read.
pub const DELAY: &str = "x-delay";
/// A deferred copy on its way to a delay queue through the delay headers exchange: the delay
/// queue's name (see `Retry::to_source_queue`).
pub const DELAY_QUEUE: &str = "x-prereq-delay-queue";
/// Quorum queues: how many times the broker got the message back (set by the broker; read to
/// stay under the queue's delivery limit, never copied).
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Deferred copies: the identity of this one copy (each deferral writes a new one). A second
/// delivery of a copy the consumer has settled or still holds is a duplicate of the broker's,
/// dropped (a quorum delay queue dead-letters at least once). Dead letters carry none.
pub const COPY: &str = "x-prereq-copy";
/// Replayed copies: how many times the message was replayed from a dead-letter queue (see
/// [`crate::amqp::replay`]).
pub const REPLAYED: &str = "x-prereq-replayed";

/// Widen any AMQP integer (or integer string) to `i64`; `None` for negative values and for
/// anything that is not an integer.
///
/// Accepted: every signed and unsigned integer width, the 64-bit timestamp (the only unsigned
/// 64-bit type on the wire), decimal strings (short or long, surrounding spaces allowed, an
/// optional `+`), and floats holding a whole number (some clients send every number as a
/// double). Rejected: negatives, fractions, NaN, booleans, decimals, tables, arrays, bytes.
pub(crate) fn int_value(value: &AMQPValue) -> Option<i64> {
    let v: i64 = match value {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?,
        AMQPValue::ShortString(s) => parse_int(s.as_str())?,
        AMQPValue::LongString(s) => parse_int(std::str::from_utf8(s.as_bytes()).ok()?)?,
        AMQPValue::Float(f) => float_int(f64::from(*f))?,
        AMQPValue::Double(f) => float_int(*f)?,
        _ => return None,
    };
    (v >= 0).then_some(v)
}

fn parse_int(s: &str) -> Option<i64> {
    let s = s.trim();
    let digits = s.strip_prefix('+').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i64>().ok()
}

fn float_int(f: f64) -> Option<i64> {
    // 2^53: beyond it a double no longer holds every integer exactly.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    (f.is_finite() && f.fract() == 0.0 && (0.0..=EXACT).contains(&f)).then_some(f as i64)
}

/// An integer header, decoded by [`int_value`].
pub(crate) fn get_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    headers?.inner().get(name).and_then(int_value)
}

/// An integer header as a count: like [`get_int`], saturating at `u32::MAX`.
pub(crate) fn get_count(headers: Option<&FieldTable>, name: &str) -> Option<u32> {
    get_int(headers, name).map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// A string header (short or long string; invalid UTF-8 is replaced, other types are absent).
pub(crate) fn get_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// What prereq reads from an incoming message's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Incoming {
    /// Deferrals so far: the larger of [`ATTEMPT`] and [`RETRY`] (another consumer of the same
    /// queue may only know `x-retry`); 0 when neither is readable.
    pub(crate) attempt: u32,
    /// The per-message limit from [`RETRY_LIMIT`], when readable.
    pub(crate) max_attempts: Option<u32>,
    /// [`FIRST_SEEN`], when readable.
    pub(crate) first_seen_ms: Option<i64>,
    /// [`DELIVERY_COUNT`] (quorum queues), when readable.
    pub(crate) delivery_count: Option<u32>,
}

/// Decode the headers prereq cares about; never fails.
pub(crate) fn read_incoming(headers: Option<&FieldTable>) -> Incoming {
    let own = get_count(headers, ATTEMPT);
    let demo = get_count(headers, RETRY);
    Incoming {
        attempt: own.max(demo).unwrap_or(0),
        max_attempts: get_count(headers, RETRY_LIMIT),
        first_seen_ms: get_int(headers, FIRST_SEEN),
        delivery_count: get_count(headers, DELIVERY_COUNT),
    }
}

/// Where a message originally came from, and since when prereq knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The exchange it was first published to.
    pub(crate) exchange: String,
    /// The routing key it was first published with.
    pub(crate) routing_key: String,
    /// When prereq first saw it (ms since the Unix epoch).
    pub(crate) first_seen_ms: i64,
}

impl Origin {
    /// The origin recorded in `headers` if any, else this delivery's exchange and routing key
    /// and `now_ms`.
    pub(crate) fn of(
        headers: Option<&FieldTable>,
        exchange: &str,
        routing_key: &str,
        now_ms: i64,
    ) -> Self {
        Self {
            exchange: get_str(headers, ORIGINAL_EXCHANGE).unwrap_or_else(|| exchange.to_owned()),
            routing_key: get_str(headers, ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| routing_key.to_owned()),
            first_seen_ms: get_int(headers, FIRST_SEEN).unwrap_or(now_ms),
        }
    }
}

fn key(name: &str) -> ShortString {
    // Every name used here is a constant far below the 255-byte limit.
    ShortString::try_new(name).unwrap_or_default()
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A count as a 32-bit integer (the width the original demo reads), saturating.
fn int32(v: u64) -> AMQPValue {
    AMQPValue::LongInt(i32::try_from(v).unwrap_or(i32::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn with_origin(original: Option<&FieldTable>, origin: &Origin) -> FieldTable {
    let mut h = original.cloned().unwrap_or_default();
    h.insert(key(ORIGINAL_EXCHANGE), long(&origin.exchange));
    h.insert(key(ORIGINAL_ROUTING_KEY), long(&origin.routing_key));
    h.insert(
        key(FIRST_SEEN),
        AMQPValue::LongLongInt(origin.first_seen_ms),
    );
    h
}

/// Headers of a deferred copy: the original's (without the broker's `x-delivery-count`, nor a
/// previous delay queue's name), plus
/// the copy's own identity ([`COPY`]), the new attempt (as both [`ATTEMPT`] and [`RETRY`]),
/// the origin, and [`DELAY`] in
/// milliseconds — the delay itself on the delayed-message exchange, and for the payment demo's
/// consumers, which require it as a 32-bit integer, on the delay-queue path too (where no
/// exchange reads it).
pub(crate) fn defer_headers(
    original: Option<&FieldTable>,
    origin: &Origin,
    attempt: u32,
    delay: Duration,
    copy: &str,
) -> FieldTable {
    let mut h = given_back_headers(original);
    h = with_origin(Some(&h), origin);
    h.insert(key(COPY), long(copy));
    h.insert(key(ATTEMPT), int32(u64::from(attempt)));
    h.insert(key(RETRY), int32(u64::from(attempt)));
    let ms = millis(delay);
    let v = match i32::try_from(ms) {
        Ok(small) => AMQPValue::LongInt(small),
        Err(_) => AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
    };
    h.insert(key(DELAY), v);
    h
}

/// Route a deferred copy to the delay queue `queue` through the delay headers exchange.
pub(crate) fn set_delay_queue(h: &mut FieldTable, queue: &str) {
    h.insert(key(DELAY_QUEUE), long(queue));
}

/// Headers of a message given back by a copy (rather than a requeue, near a quorum queue's
/// delivery limit): the original's, without the broker's `x-delivery-count`.
pub(crate) fn given_back_headers(original: Option<&FieldTable>) -> FieldTable {
    let mut map = original.map(|h| h.inner().clone()).unwrap_or_default();
    map.remove(DELIVERY_COUNT);
    map.remove(DELAY_QUEUE);
    FieldTable::from(map)
}

/// Headers of a dead-lettered copy: the original's (without [`DELAY`] nor [`COPY`]: a replayed
/// dead letter is a new message), plus the origin, the reason's kind and
/// text, the attempts, the last error and the time.
pub(crate) fn dead_letter_headers(
    original: Option<&FieldTable>,
    origin: &Origin,
    dead: &DeadLetter,
    now_ms: i64,
) -> FieldTable {
    let mut map = with_origin(original, origin).inner().clone();
    map.remove(DELAY);
    map.remove(COPY);
    let mut h = FieldTable::from(map);
    h.insert(key(DEAD_LETTER_KIND), long(dead.kind.as_str()));
    h.insert(key(DEAD_LETTER_REASON), long(&dead.reason));
    h.insert(key(LAST_ERROR), long(&dead.reason));
    h.insert(key(ATTEMPTS), int32(u64::from(dead.attempts)));
    h.insert(key(DEAD_LETTERED_AT), AMQPValue::LongLongInt(now_ms));
    h
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod prop_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeadLetterKind;
    use lapin::types::{DecimalValue, FieldArray};

    fn table(name: &str, v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(name.into(), v);
        t
    }

    #[test]
    fn every_integer_width_widens() {
        let cases = [
            AMQPValue::ShortShortInt(7),
            AMQPValue::ShortShortUInt(7),
            AMQPValue::ShortInt(7),
            AMQPValue::ShortUInt(7),
            AMQPValue::LongInt(7),
            AMQPValue::LongUInt(7),
            AMQPValue::LongLongInt(7),
            AMQPValue::Timestamp(7),
            AMQPValue::ShortString("7".into()),
            AMQPValue::LongString(" +7 ".into()),
            AMQPValue::Float(7.0),
            AMQPValue::Double(7.0),
        ];
        for v in cases {
            assert_eq!(int_value(&v), Some(7), "{v:?}");
        }
    }

    #[test]
    fn extremes_of_each_width() {
        assert_eq!(int_value(&AMQPValue::ShortShortUInt(u8::MAX)), Some(255));
        assert_eq!(int_value(&AMQPValue::ShortUInt(u16::MAX)), Some(65_535));
        assert_eq!(
            int_value(&AMQPValue::LongUInt(u32::MAX)),
            Some(i64::from(u32::MAX))
        );
        assert_eq!(int_value(&AMQPValue::LongLongInt(i64::MAX)), Some(i64::MAX));
        assert_eq!(int_value(&AMQPValue::Timestamp(u64::MAX)), None);
        assert_eq!(
            int_value(&AMQPValue::LongString("9223372036854775808".into())),
            None
        );
    }

    #[test]
    fn negatives_and_garbage_are_absent() {
        let cases = [
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortInt(-1),
            AMQPValue::LongInt(i32::MIN),
            AMQPValue::LongLongInt(-5),
            AMQPValue::Boolean(true),
            AMQPValue::ShortString("abc".into()),
            AMQPValue::LongString("1500.5".into()),
            AMQPValue::LongString("-3".into()),
            AMQPValue::LongString("".into()),
            AMQPValue::LongString(vec![0xff, 0xfe].into()),
            AMQPValue::Double(1.5),
            AMQPValue::Double(f64::NAN),
            AMQPValue::Double(f64::INFINITY),
            AMQPValue::Float(-2.0),
            AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 3 }),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
            AMQPValue::FieldTable(table("x", AMQPValue::LongInt(1))),
            AMQPValue::ByteArray(vec![1].into()),
            AMQPValue::Void,
        ];
        for v in cases {
            assert_eq!(int_value(&v), None, "{v:?}");
        }
    }

    #[test]
    fn incoming_prefers_the_larger_attempt_and_reads_the_limit() {
        let mut h = FieldTable::default();
        h.insert(RETRY.into(), AMQPValue::ShortInt(3));
        h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(2));
        h.insert(RETRY_LIMIT.into(), AMQPValue::LongUInt(10));
        h.insert(DELAY.into(), AMQPValue::LongInt(-999_999));
        let inc = read_incoming(Some(&h));
        assert_eq!(inc.attempt, 3);
        assert_eq!(inc.max_attempts, Some(10));
        assert_eq!(inc.first_seen_ms, None);
    }

    #[test]
    fn incoming_without_headers_is_fresh() {
        assert_eq!(read_incoming(None), Incoming::default());
        let h = table(RETRY_LIMIT, AMQPValue::LongString("garbage".into()));
        assert_eq!(read_incoming(Some(&h)).max_attempts, None);
    }

    #[test]
    fn huge_counts_saturate() {
        let h = table(ATTEMPT, AMQPValue::LongLongInt(i64::MAX));
        assert_eq!(read_incoming(Some(&h)).attempt, u32::MAX);
    }

    #[test]
    fn delay_is_never_read() {
        let h = table(DELAY, AMQPValue::LongInt(5000));
        assert_eq!(read_incoming(Some(&h)), Incoming::default());
    }

    fn origin() -> Origin {
        Origin {
            exchange: "payments".into(),
            routing_key: "process.payment".into(),
            first_seen_ms: 1_000,
        }
    }

    #[test]
    fn defer_headers_carry_attempt_origin_and_delay() {
        let orig = table(RETRY_LIMIT, AMQPValue::LongInt(10));
        let h = defer_headers(Some(&orig), &origin(), 4, Duration::from_millis(2500), "c1");
        assert_eq!(get_str(Some(&h), COPY).as_deref(), Some("c1"));
        assert_eq!(h.inner().get(ATTEMPT), Some(&AMQPValue::LongInt(4)));
        assert_eq!(h.inner().get(RETRY), Some(&AMQPValue::LongInt(4)));
        assert_eq!(h.inner().get(DELAY), Some(&AMQPValue::LongInt(2500)));
        assert_eq!(h.inner().get(RETRY_LIMIT), Some(&AMQPValue::LongInt(10)));
        assert_eq!(
            get_str(Some(&h), ORIGINAL_EXCHANGE).as_deref(),
            Some("payments")
        );
        assert_eq!(
            get_str(Some(&h), ORIGINAL_ROUTING_KEY).as_deref(),
            Some("process.payment")
        );
        assert_eq!(get_int(Some(&h), FIRST_SEEN), Some(1_000));
        let back = read_incoming(Some(&h));
        assert_eq!(back.attempt, 4);
        assert_eq!(back.max_attempts, Some(10));
    }

    #[test]
    fn copies_always_carry_x_delay_and_never_the_delivery_count() {
        let mut orig = table(DELAY, AMQPValue::LongInt(0));
        orig.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        let h = defer_headers(Some(&orig), &origin(), 1, Duration::from_secs(1), "c1");
        assert_eq!(h.inner().get(DELAY), Some(&AMQPValue::LongInt(1000)));
        assert!(!h.contains_key(DELIVERY_COUNT));
        assert!(!given_back_headers(Some(&orig)).contains_key(DELIVERY_COUNT));
        assert_eq!(read_incoming(Some(&orig)).delivery_count, Some(3));
    }

    #[test]
    fn huge_delay_uses_64_bits() {
        let h = defer_headers(None, &origin(), 1, Duration::from_secs(3_000_000), "c1");
        assert_eq!(
            h.inner().get(DELAY),
            Some(&AMQPValue::LongLongInt(3_000_000_000))
        );
    }

    #[test]
    fn origin_prefers_recorded_headers() {
        let h = defer_headers(None, &origin(), 1, Duration::ZERO, "c1");
        let o = Origin::of(Some(&h), "payments", "reprocess.payment", 99);
        assert_eq!(o, origin());
        let fresh = Origin::of(None, "e", "k", 99);
        assert_eq!(fresh.first_seen_ms, 99);
        assert_eq!(fresh.exchange, "e");
    }

    #[test]
    fn dead_letter_headers_carry_the_reason() {
        let dead = DeadLetter {
            kind: DeadLetterKind::KeyNeverArrived,
            reason: "client 5 never registered".into(),
            attempts: 10,
        };
        let h = dead_letter_headers(None, &origin(), &dead, 42);
        assert_eq!(
            get_str(Some(&h), DEAD_LETTER_KIND).as_deref(),
            Some("key-never-arrived")
        );
        assert_eq!(
            get_str(Some(&h), DEAD_LETTER_REASON).as_deref(),
            Some("client 5 never registered")
        );
        assert_eq!(
            get_str(Some(&h), LAST_ERROR).as_deref(),
            Some("client 5 never registered")
        );
        assert_eq!(get_int(Some(&h), ATTEMPTS), Some(10));
        assert_eq!(get_int(Some(&h), DEAD_LETTERED_AT), Some(42));
        assert_eq!(
            get_str(Some(&h), ORIGINAL_EXCHANGE).as_deref(),
            Some("payments")
        );
        assert_eq!(get_int(Some(&h), FIRST_SEEN), Some(1_000));
    }
}
