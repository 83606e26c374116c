//! Arbitrary bytes as an AMQP header table (what lapin hands prereq for a delivery), through
//! every public header decoder and the builders of deferred and dead-lettered copies: nothing
//! may panic, negative or garbage values must read as absent, `x-delay` must never be read.
#![no_main]

use std::time::Duration;

use lapin::types::parsing::parse_field_table;
use libfuzzer_sys::fuzz_target;
use prereq::amqp::headers::{self, Origin};
use prereq::transport::{DeadLetter, DeadLetterKind};

fuzz_target!(|data: &[u8]| {
    // A length prefix that matches, so the parser walks the entries.
    let mut bytes = u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes().to_vec();
    bytes.extend_from_slice(data);
    let Ok((_, table)) = parse_field_table(bytes.as_slice()) else {
        return;
    };
    let incoming = headers::read_incoming(Some(&table));
    for name in [headers::ATTEMPT, headers::RETRY, headers::RETRY_LIMIT, headers::FIRST_SEEN] {
        if let Some(n) = headers::get_int(Some(&table), name) {
            assert!(n >= 0, "{name} decoded negative: {n}");
        }
        let _ = headers::get_str(Some(&table), name);
    }
    let mut without_delay = table.inner().clone();
    without_delay.remove(headers::DELAY);
    assert_eq!(
        headers::read_incoming(Some(&without_delay.into())),
        incoming,
        "x-delay was read"
    );
    let origin = Origin::of(Some(&table), "exchange", "key", 1);
    let attempt = incoming.attempt.saturating_add(1);
    for with_x_delay in [false, true] {
        let h = headers::defer_headers(Some(&table), &origin, attempt, Duration::from_secs(1), with_x_delay);
        assert_eq!(
            headers::read_incoming(Some(&h)).attempt,
            attempt.min(i32::MAX as u32),
            "a copy must carry the new attempt"
        );
    }
    let dead = DeadLetter {
        kind: DeadLetterKind::Undecodable,
        reason: "fuzz".into(),
        attempts: incoming.attempt,
    };
    let _ = headers::dead_letter_headers(Some(&table), &origin, &dead, 0);
});
