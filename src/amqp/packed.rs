//! [`Packed`]: a delivery's properties (headers included) kept in their wire form while the
//! delivery is unsettled, and unpacked only when a copy of it is published.
//!
//! lapin hands each delivery's properties over as a `BasicProperties`: 296 bytes inline, plus a
//! B-tree node of several hundred bytes when it has headers, and a string allocation per
//! header name and text value. Most deliveries are acknowledged without ever being copied, and
//! a held message may wait minutes, so the transport keeps the AMQP content-header encoding
//! instead (lapin's own serializer and parser): a few bytes to a few dozen for typical headers.

use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};

use super::error::AmqpError;

/// Encodings up to this many bytes are kept inline (no allocation): a persistent message with
/// a short message id or content type fits.
const INLINE: usize = 22;

/// A delivery's properties, in their AMQP wire encoding (or, should encoding ever fail, as
/// they came).
#[derive(Clone, Debug)]
pub(crate) enum Packed {
    /// A short content-header property list, in place: `bytes[..len]`.
    Inline {
        /// How many of `bytes` are used.
        len: u8,
        /// The encoding, then zeros.
        bytes: [u8; INLINE],
    },
    /// The content-header property list: flags, then each present property.
    Wire(Box<[u8]>),
    /// What could not be encoded, kept whole.
    Whole(Box<BasicProperties>),
}

impl Packed {
    /// Pack `properties`.
    pub(crate) fn pack(properties: BasicProperties) -> Self {
        let context = cookie_factory::WriteContext {
            write: Vec::with_capacity(16),
            position: 0,
        };
        let packed = gen_properties(&properties)(context).map(|done| done.write);
        match packed {
            Ok(wire) if wire.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..wire.len()].copy_from_slice(&wire);
                Self::Inline {
                    len: wire.len() as u8,
                    bytes,
                }
            }
            Ok(wire) => Self::Wire(wire.into_boxed_slice()),
            Err(_) => Self::Whole(Box::new(properties)),
        }
    }

    /// The properties as they came.
    pub(crate) fn unpack(&self) -> Result<BasicProperties, AmqpError> {
        let wire = match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Wire(bytes) => &bytes[..],
            Self::Whole(properties) => return Ok((**properties).clone()),
        };
        match parse_properties(wire) {
            Ok((_, properties)) => Ok(properties),
            Err(e) => Err(AmqpError::Broker {
                operation: "read back a delivery's properties".to_owned(),
                message: format!("{e:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    use proptest::prelude::*;

    use super::*;

    fn headers(entries: Vec<(String, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(k), v);
        }
        t
    }

    fn value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            ".{0,40}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(2, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                proptest::collection::vec(("[a-z-]{1,12}", inner), 0..4)
                    .prop_map(|e| AMQPValue::FieldTable(headers(e))),
            ]
        })
    }

    fn properties() -> impl Strategy<Value = BasicProperties> {
        (
            proptest::option::of("[a-z/+-]{0,30}"),
            proptest::option::of(any::<u8>()),
            proptest::option::of(".{0,40}"),
            proptest::option::of(any::<u64>()),
            proptest::option::of(proptest::collection::vec(("[a-z-]{1,20}", value()), 0..6)),
            proptest::option::of(1u8..=2),
            proptest::option::of("[a-z0-9.]{0,20}"),
        )
            .prop_map(|(ct, prio, id, ts, h, mode, expiration)| {
                let mut p = BasicProperties::default();
                if let Some(v) = ct {
                    p = p.with_content_type(v.into());
                }
                if let Some(v) = prio {
                    p = p.with_priority(v);
                }
                if let Some(v) = id {
                    p = p.with_message_id(v.into());
                }
                if let Some(v) = ts {
                    p = p.with_timestamp(v);
                }
                if let Some(v) = h {
                    p = p.with_headers(headers(v));
                }
                if let Some(v) = mode {
                    p = p.with_delivery_mode(v);
                }
                if let Some(v) = expiration {
                    p = p.with_expiration(v.into());
                }
                p
            })
    }

    proptest! {
        /// Whatever the properties, a copy is published with exactly the properties that came.
        #[test]
        fn packing_keeps_every_property(p in properties()) {
            let packed = Packed::pack(p.clone());
            prop_assert!(!matches!(packed, Packed::Whole(_)));
            let back = packed.unpack().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, p);
        }
    }

    #[test]
    fn typical_properties_are_kept_in_place() {
        let p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id("pay-1".into());
        assert!(
            matches!(Packed::pack(p), Packed::Inline { .. }),
            "not inline"
        );
        assert_eq!(std::mem::size_of::<Packed>(), 24);
    }
}
