//! Key notifications: [`KeyNotifier`] tells every subscriber ([`KeyWakes`]) that a key became
//! known ([`Wake`]).

use std::fmt;

use tokio::sync::broadcast;

/// What a subscription to a [`KeySource`](crate::KeySource) reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Wake<K> {
    /// This key is known now.
    Known(K),
    /// Notifications may have been missed (the subscriber fell behind, or the source's listener
    /// reconnected): every held key should be looked up again.
    Resync,
}

/// The sending side of key notifications: a source keeps one and calls [`KeyNotifier::notify`]
/// for every key that becomes known. Clones share the same subscribers.
pub struct KeyNotifier<K> {
    tx: broadcast::Sender<Wake<K>>,
}

/// How many notifications a slow subscriber may fall behind before it gets [`Wake::Resync`].
pub const DEFAULT_NOTIFY_CAPACITY: usize = 4096;

impl<K> Clone for KeyNotifier<K> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K> fmt::Debug for KeyNotifier<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyNotifier")
            .field("subscribers", &self.tx.receiver_count())
            .finish()
    }
}

impl<K: Clone> Default for KeyNotifier<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone> KeyNotifier<K> {
    /// A notifier whose subscribers may fall [`DEFAULT_NOTIFY_CAPACITY`] notifications behind.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_NOTIFY_CAPACITY)
    }

    /// A notifier whose subscribers may fall `capacity` notifications behind (at least 1)
    /// before they get [`Wake::Resync`] instead.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Tell every subscriber that `key` is known. Cheap without subscribers.
    pub fn notify(&self, key: K) {
        // No subscriber: nothing is held anywhere that could wait for the key.
        let _ = self.tx.send(Wake::Known(key));
    }

    /// Tell every subscriber that notifications may have been missed.
    pub fn resync(&self) {
        let _ = self.tx.send(Wake::Resync);
    }

    /// A new subscription, seeing what is notified from now on.
    pub fn subscribe(&self) -> KeyWakes<K> {
        KeyWakes {
            rx: Some(self.tx.subscribe()),
        }
    }
}

/// A subscription to a [`KeySource`](crate::KeySource)'s notifications, from [`KeySource::subscribe`](crate::KeySource::subscribe).
pub struct KeyWakes<K> {
    rx: Option<broadcast::Receiver<Wake<K>>>,
}

impl<K> fmt::Debug for KeyWakes<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyWakes")
            .field("subscribed", &self.rx.is_some())
            .finish()
    }
}

impl<K: Clone> KeyWakes<K> {
    /// A subscription that never reports anything, for sources that cannot tell.
    pub fn none() -> Self {
        Self { rx: None }
    }

    /// The next notification; `None` once the source is gone (or for [`KeyWakes::none`]).
    /// A subscriber that fell behind gets [`Wake::Resync`] in place of what it missed.
    pub async fn next(&mut self) -> Option<Wake<K>> {
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(wake) => Some(wake),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Wake::Resync),
            Err(broadcast::error::RecvError::Closed) => {
                self.rx = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_notifications_and_resync_when_they_fall_behind() {
        let notifier = KeyNotifier::with_capacity(2);
        let mut a = notifier.subscribe();
        notifier.notify(1u64);
        assert_eq!(a.next().await, Some(Wake::Known(1)));
        for k in 0..5 {
            notifier.notify(k);
        }
        assert_eq!(a.next().await, Some(Wake::Resync), "fell behind");
        assert_eq!(a.next().await, Some(Wake::Known(3)));
        drop(notifier);
        assert_eq!(a.next().await, Some(Wake::Known(4)));
        assert_eq!(a.next().await, None, "the source is gone");
        assert_eq!(KeyWakes::<u64>::none().next().await, None);
    }
}
