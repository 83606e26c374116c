//! What processes a message: any async function of the message, or of the message and its
//! [`Context`].

use std::future::Future;

use futures::future::BoxFuture;

use crate::context::Context;
use crate::error::HandlerError;

/// A message handler: implemented for every `Fn(M) -> impl Future<Output = Result<(),
/// HandlerError>>` and every `Fn(M, Context<K>) -> …` that is `Send + Sync + 'static`, so
/// closures and `async fn`s work as they are.
///
/// `Args` only tells the two shapes apart (`(M,)` or `(M, Context<K>)`); it is inferred.
///
/// `Ok` acknowledges the message; an error defers or dead-letters it (see [`HandlerError`]). A
/// panic counts as a retryable error, with the panic's message as the reason.
pub trait Handler<K, M, Args>: Send + Sync + 'static {
    /// Process `message`; `context` describes the delivery.
    fn call(&self, message: M, context: Context<K>)
    -> BoxFuture<'static, Result<(), HandlerError>>;
}

impl<K, M, F, Fut> Handler<K, M, (M,)> for F
where
    F: Fn(M) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(
        &self,
        message: M,
        _context: Context<K>,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(self(message))
    }
}

impl<K, M, F, Fut> Handler<K, M, (M, Context<K>)> for F
where
    F: Fn(M, Context<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(
        &self,
        message: M,
        context: Context<K>,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(self(message, context))
    }
}
