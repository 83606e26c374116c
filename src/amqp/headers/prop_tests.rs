//! Hostile headers: property tests over arbitrary AMQP header tables, through the decoding
//! functions of the headers module.
//!
//! Every AMQP value type (booleans, every signed and unsigned integer width, floats, decimals,
//! short and long strings, byte arrays, nested arrays and tables, timestamps, void), with
//! negative, huge, fractional and garbage values, under the attempt (`x-prereq-attempt`,
//! `x-retry`), limit (`x-retry-limit`), first-seen and delay (`x-delay`) header names and under
//! random names. The decoders must never panic, must widen integers of every width exactly,
//! must treat negative and non-integer values as absent, and must never read `x-delay`.
//! Tables also go through the AMQP wire encoding and lapin's parser (what a consumer really
//! receives), and arbitrary bytes through the parser: whatever parses decodes without a panic.
use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    self as headers, ATTEMPT, DELAY, FIRST_SEEN, Incoming, Origin, RETRY, RETRY_LIMIT, get_count,
    get_int, get_str, int_value, read_incoming,
};
use crate::{DeadLetter, DeadLetterKind};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, ShortString};
use proptest::prelude::*;

/// Strings that look like integers (in every spelling), and garbage.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[ \t]{0,2}[+-]{0,2}[0-9]{1,22}[ \t]{0,2}",
        "[0-9]{1,6}\\.[0-9]{1,3}",
        "0x[0-9a-f]{1,8}",
        "[0-9]{1,5}[a-z]{1,3}",
        "\\PC{0,12}",
        Just(String::new()),
        Just("-0".to_owned()),
        Just("NaN".to_owned()),
    ]
}

fn short_string(s: String) -> ShortString {
    // Every generated string is far below the 255-byte limit, but stay safe.
    let mut s = s;
    while s.len() > 255 {
        s.pop();
    }
    ShortString::try_new(s).expect("at most 255 bytes")
}

fn leaf() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        // Small values too: the interesting range of counts.
        (-3i64..20).prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (-3i64..1 << 54).prop_map(|n| AMQPValue::Double(n as f64)),
        (-3i32..1 << 25).prop_map(|n| AMQPValue::Float(n as f32)),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        text().prop_map(|s| AMQPValue::ShortString(short_string(s))),
        text().prop_map(|s| AMQPValue::LongString(s.into())),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(|b| AMQPValue::LongString(b.into())),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        (0u64..1 << 45).prop_map(AMQPValue::Timestamp),
        proptest::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ]
}

fn value() -> impl Strategy<Value = AMQPValue> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::btree_map(name(), inner, 0..4)
                .prop_map(|m| AMQPValue::FieldTable(FieldTable::from(m))),
        ]
    })
}

/// The header names prereq reads or must ignore, and random ones.
fn name() -> impl Strategy<Value = ShortString> {
    prop_oneof![
        Just(ATTEMPT.to_owned()),
        Just(RETRY.to_owned()),
        Just(RETRY_LIMIT.to_owned()),
        Just(FIRST_SEEN.to_owned()),
        Just(DELAY.to_owned()),
        "x-[a-z-]{0,12}",
        "\\PC{0,16}",
    ]
    .prop_map(short_string)
}

fn table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::btree_map(name(), value(), 0..8).prop_map(FieldTable::from)
}

/// What an integer header should decode to, stated independently of the implementation.
fn expected(v: &AMQPValue) -> Option<i64> {
    let non_negative = |n: i64| (n >= 0).then_some(n);
    let whole = |f: f64| {
        (f.is_finite() && f.fract() == 0.0 && f >= 0.0 && f <= 2f64.powi(53)).then_some(f as i64)
    };
    let text = |s: &str| {
        let t = s.trim();
        if t.starts_with('-') {
            None
        } else {
            t.parse::<i64>().ok()
        }
    };
    match v {
        AMQPValue::ShortShortInt(n) => non_negative((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => non_negative((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => non_negative((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => non_negative(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::Float(f) => whole((*f).into()),
        AMQPValue::Double(f) => whole(*f),
        AMQPValue::ShortString(s) => text(s.as_str()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().and_then(text),
        AMQPValue::Boolean(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => None,
    }
}

fn expected_count(t: &FieldTable, name: &str) -> Option<u32> {
    t.inner()
        .get(name)
        .and_then(expected)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn with(t: &FieldTable, name: &str, v: Option<AMQPValue>) -> FieldTable {
    let mut m = t.inner().clone();
    match v {
        Some(v) => {
            m.insert(short_string(name.to_owned()), v);
        }
        None => {
            m.remove(name);
        }
    }
    FieldTable::from(m)
}

/// The same table as it can exist on the wire: AMQP has no short-string *value* type (lapin's
/// `ShortString` value is internal and encodes as an unknown type), so they become long strings.
fn wire_safe(t: &FieldTable) -> FieldTable {
    fn value(v: &AMQPValue) -> AMQPValue {
        match v {
            AMQPValue::ShortString(s) => AMQPValue::LongString(s.as_str().into()),
            AMQPValue::FieldArray(a) => {
                AMQPValue::FieldArray(a.as_slice().iter().map(value).collect::<Vec<_>>().into())
            }
            AMQPValue::FieldTable(t) => AMQPValue::FieldTable(wire_safe(t)),
            other => other.clone(),
        }
    }
    FieldTable::from(
        t.inner()
            .iter()
            .map(|(k, v)| (k.clone(), value(v)))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// Encode a table as on the wire (length-prefixed) and parse it back with lapin's parser.
fn through_the_wire(t: &FieldTable) -> FieldTable {
    let serialize = lapin::types::generation::gen_field_table::<Vec<u8>>(t);
    let bytes = serialize(Vec::new().into()).expect("encode").write;
    let (rest, parsed) =
        lapin::types::parsing::parse_field_table(bytes.as_slice()).expect("parse back");
    assert!(rest.is_empty());
    parsed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Any value: the decoder agrees with the stated rules (and does not panic).
    #[test]
    fn int_value_follows_the_rules(v in value()) {
        prop_assert_eq!(int_value(&v), expected(&v), "{:?}", v);
        if let Some(n) = int_value(&v) {
            prop_assert!(n >= 0);
        }
    }

    /// Any table: the incoming headers are exactly what the rules say, names of every kind.
    #[test]
    fn read_incoming_follows_the_rules(t in table()) {
        let got = read_incoming(Some(&t));
        let own = expected_count(&t, ATTEMPT);
        let demo = expected_count(&t, RETRY);
        prop_assert_eq!(got, Incoming {
            attempt: own.max(demo).unwrap_or(0),
            max_attempts: expected_count(&t, RETRY_LIMIT),
            first_seen_ms: t.inner().get(FIRST_SEEN).and_then(expected),
            delivery_count: expected_count(&t, headers::DELIVERY_COUNT),
        }, "{:?}", t);
        for name in [ATTEMPT, RETRY, RETRY_LIMIT, FIRST_SEEN, DELAY, "anything"] {
            prop_assert_eq!(get_int(Some(&t), name), t.inner().get(name).and_then(expected));
            prop_assert_eq!(get_count(Some(&t), name), expected_count(&t, name));
            let _ = get_str(Some(&t), name);
        }
    }

    /// `x-delay` never influences what is read: absent, or any value at all.
    #[test]
    fn x_delay_is_never_read(t in table(), delay in value()) {
        let base = read_incoming(Some(&with(&t, DELAY, None)));
        prop_assert_eq!(read_incoming(Some(&t)), base);
        prop_assert_eq!(read_incoming(Some(&with(&t, DELAY, Some(delay)))), base);
    }

    /// What a consumer receives went through the wire encoding: decoding the parsed table
    /// gives the same answer as decoding the original.
    #[test]
    fn decoding_survives_the_wire(t in table()) {
        let t = wire_safe(&t);
        let parsed = through_the_wire(&t);
        prop_assert_eq!(read_incoming(Some(&parsed)), read_incoming(Some(&t)));
    }

    /// Arbitrary bytes where a header table should be: whatever lapin's parser accepts decodes
    /// without a panic.
    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        // A plausible length prefix, so that the parser looks at the entries.
        let len = u32::try_from(bytes.len()).unwrap().to_be_bytes();
        bytes.splice(0..0, len);
        if let Ok((_, t)) = lapin::types::parsing::parse_field_table(bytes.as_slice()) {
            let _ = read_incoming(Some(&t));
            let _ = Origin::of(Some(&t), "e", "k", 1);
        }
    }

    /// Whatever garbage the original carries, a deferred copy reads back with exactly the new
    /// attempt count (saturated to the 32-bit width it is written in), keeps a readable limit,
    /// and carries its delay in `x-delay` and its own copy identity (a dead letter carries
    /// neither).
    #[test]
    fn copies_of_hostile_messages_carry_the_new_attempt(
        t in table(),
        attempt in prop_oneof![0u32..100, any::<u32>()],
        delay_ms in any::<u32>(),
    ) {
        let t = wire_safe(&t);
        let origin = Origin::of(Some(&t), "ex", "rk", 7);
        let delay = Duration::from_millis(delay_ms.into());
        let h = headers::defer_headers(Some(&t), &origin, attempt, delay, "copy-7");
        // The copy's identity is its own, whatever the original carried.
        let copy = get_str(Some(&h), headers::COPY);
        prop_assert_eq!(copy.as_deref(), Some("copy-7"));
        let back = read_incoming(Some(&through_the_wire(&h)));
        prop_assert_eq!(back.attempt, attempt.min(i32::MAX as u32));
        prop_assert_eq!(back.max_attempts, expected_count(&t, RETRY_LIMIT));
        prop_assert_eq!(get_int(Some(&h), DELAY), Some(i64::from(delay_ms)));
        let dead = DeadLetter::new(DeadLetterKind::KeyNeverArrived, "r", attempt);
        let d = headers::dead_letter_headers(Some(&t), &origin, &dead, 9);
        prop_assert!(!d.contains_key(DELAY));
        prop_assert!(!d.contains_key(headers::COPY));
        let redeferred = headers::defer_headers(Some(&h), &origin, attempt, delay, "copy-8");
        let copy = get_str(Some(&redeferred), headers::COPY);
        prop_assert_eq!(copy.as_deref(), Some("copy-8"));
        let kind = get_str(Some(&d), headers::DEAD_LETTER_KIND);
        prop_assert_eq!(kind.as_deref(), Some("key-never-arrived"));
    }

    /// Every integer width, every value: the attempt, limit and first-seen headers widen it
    /// exactly (negative → absent, beyond u32 → saturated count).
    #[test]
    fn every_width_widens_exactly(
        n in any::<i64>(),
        width in 0usize..8,
    ) {
        let (v, exact): (AMQPValue, Option<i64>) = match width {
            0 => (AMQPValue::ShortShortInt(n as i8), Some(i64::from(n as i8))),
            1 => (AMQPValue::ShortShortUInt(n as u8), Some(i64::from(n as u8))),
            2 => (AMQPValue::ShortInt(n as i16), Some(i64::from(n as i16))),
            3 => (AMQPValue::ShortUInt(n as u16), Some(i64::from(n as u16))),
            4 => (AMQPValue::LongInt(n as i32), Some(i64::from(n as i32))),
            5 => (AMQPValue::LongUInt(n as u32), Some(i64::from(n as u32))),
            6 => (AMQPValue::LongLongInt(n), Some(n)),
            _ => (AMQPValue::Timestamp(n as u64), Some(n)),
        };
        let want = exact.filter(|n| *n >= 0);
        let count = want.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        for name in [ATTEMPT, RETRY, RETRY_LIMIT, FIRST_SEEN] {
            let t = FieldTable::from(BTreeMap::from([(short_string(name.to_owned()), v.clone())]));
            let t = through_the_wire(&t);
            prop_assert_eq!(get_int(Some(&t), name), want);
            prop_assert_eq!(get_count(Some(&t), name), count);
        }
        let t = FieldTable::from(BTreeMap::from([(short_string(ATTEMPT.to_owned()), v.clone())]));
        prop_assert_eq!(read_incoming(Some(&t)).attempt, count.unwrap_or(0));
        let t = FieldTable::from(BTreeMap::from([(short_string(RETRY_LIMIT.to_owned()), v)]));
        prop_assert_eq!(read_incoming(Some(&t)).max_attempts, count);
    }
}

#[test]
fn no_headers_at_all_is_a_fresh_message() {
    assert_eq!(read_incoming(None), Incoming::default());
    assert_eq!(
        read_incoming(Some(&FieldTable::default())),
        Incoming::default()
    );
}
