//! Dead letters: why a message was given up, as a class and a readable text.

/// Why a message was dead-lettered: a class (for metrics and routing) and a readable text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The class of the reason.
    pub kind: DeadLetterKind,
    /// A human-readable explanation (the decode error, the handler's error, …).
    pub reason: String,
    /// The message's attempt when it was dead-lettered (how many retries it had).
    pub attempts: u32,
}

/// The class of a dead-letter reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// The body did not decode.
    Undecodable,
    /// The handler returned a permanent error.
    Rejected,
    /// The backoff policy (or the message's own limit) gave up while the key was still unknown.
    KeyNeverArrived,
    /// The backoff policy gave up while the handler kept failing with retryable errors.
    RetriesExhausted,
    /// The key source refused the message's key (too long for its column, out of range, …).
    InvalidKey,
}

impl DeadLetterKind {
    /// A short, stable label (`undecodable`, `rejected`, `key-never-arrived`,
    /// `retries-exhausted`, `invalid-key`), for headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::Rejected => "rejected",
            Self::KeyNeverArrived => "key-never-arrived",
            Self::RetriesExhausted => "retries-exhausted",
            Self::InvalidKey => "invalid-key",
        }
    }
}

impl std::fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DeadLetter {
    /// A dead letter whose reason is at most [`MAX_REASON`] bytes: a longer one keeps its head
    /// and its tail (where a decode error says the line and column) around a note of what was
    /// cut.
    pub fn new(kind: DeadLetterKind, reason: impl Into<String>, attempts: u32) -> Self {
        Self {
            kind,
            reason: bounded(reason.into()),
            attempts,
        }
    }
}

/// The longest dead-letter reason, in bytes. A reason travels in a broker header and in log
/// lines, and a decode error can quote a whole body (serde quotes the offending string): a
/// 10 MB body must not make a 10 MB header, which the broker would refuse.
pub const MAX_REASON: usize = 1024;

fn bounded(reason: String) -> String {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    // " … (18446744073709551615 bytes cut) … " is at most 44 bytes.
    let keep = MAX_REASON - 44;
    let mut head = keep * 3 / 5;
    while !reason.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = reason.len() - (keep - head);
    while !reason.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} … ({} bytes cut) … {}",
        &reason[..head],
        tail - head,
        &reason[tail..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reasons_are_kept_and_long_ones_bounded_on_char_boundaries() {
        assert_eq!(bounded("short".into()), "short");
        let exact = "x".repeat(MAX_REASON);
        assert_eq!(bounded(exact.clone()), exact);
        for unit in ["a", "é", "€", "😀"] {
            let long = format!("start {} end at line 1 column 9", unit.repeat(100_000));
            let b = DeadLetter::new(DeadLetterKind::Undecodable, long, 0).reason;
            assert!(b.len() <= MAX_REASON, "{} bytes", b.len());
            assert!(b.starts_with("start "));
            assert!(b.ends_with(" end at line 1 column 9"));
            assert!(b.contains(" bytes cut) "));
        }
    }
}
