//! Prerequisite keys: where prereq learns that a key is known, and how it hears of new ones.
//!
//! A [`KeySource`] answers "is this key known?" (asynchronously, and it may fail), records the
//! keys that registrations make known, and tells every subscriber when a key becomes known by
//! any path ([`KeySource::subscribe`]): the consumer's own registrations, another consumer
//! sharing the source, the service's own code, another instance, a database trigger.
//!
//! The consumer owns a bounded cache of keys known to be known in front of the source: a known
//! key is looked up once. Keys are assumed never to disappear once known. A miss is looked up off
//! the consumer's loop and reports back; while it is in flight, later messages of the same key
//! wait behind it, in order. A lookup that fails with [`KeyError::Unavailable`] *holds* the
//! message (and logs a warning once per outage), it never dead-letters it; a key the source
//! refuses ([`KeyError::InvalidKey`], e.g. too long for its column) dead-letters the message
//! with the reason.
//!
//! Sources shipped with prereq: [`MemoryKeys`] (a set in memory, the default), and with the
//! `sqlite` / `postgres` features, database-backed sources that survive restarts and are shared
//! by instances.
//!
//! Writing a source: implement the three methods; keep a [`KeyNotifier`] and call
//! [`KeyNotifier::notify`] for every key that becomes known, [`KeyNotifier::resync`] when
//! notifications may have been missed (a listener reconnected).
//!
//! ```
//! use prereq::{KeyError, KeyNotifier, KeySource, KeyWakes};
//!
//! /// Keys are even numbers, known from the start (a toy source).
//! struct Even { notifier: KeyNotifier<u64> }
//!
//! impl KeySource<u64> for Even {
//!     type Error = std::convert::Infallible;
//!
//!     async fn contains(&self, key: &u64) -> Result<bool, KeyError<Self::Error>> {
//!         Ok(key % 2 == 0)
//!     }
//!
//!     async fn insert(&self, key: &u64) -> Result<(), KeyError<Self::Error>> {
//!         if key % 2 == 1 {
//!             return Err(KeyError::invalid_key(format!("{key} is odd")));
//!         }
//!         self.notifier.notify(*key);
//!         Ok(())
//!     }
//!
//!     fn subscribe(&self) -> KeyWakes<u64> {
//!         self.notifier.subscribe()
//!     }
//! }
//! ```

mod memory;
mod notify;
mod shared;
mod source;

pub use memory::MemoryKeys;
pub use notify::{DEFAULT_NOTIFY_CAPACITY, KeyNotifier, KeyWakes, Wake};
pub(crate) use shared::SharedSource;
pub use source::{Key, KeyError, KeySource};
