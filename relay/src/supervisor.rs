//! Runs the relay's tasks and reports the first one that fails: a task fails when it panics
//! or returns before it was asked to stop.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

/// A task as the supervisor runs it.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Shared by every supervised task of one relay.
#[derive(Clone, Default)]
pub(crate) struct Supervisor {
    failed: CancellationToken,
    first: Arc<Mutex<Option<(&'static str, String)>>>,
}

impl Supervisor {
    /// Runs `task`, recording a failure if it panics or ends before `stop` is cancelled.
    pub(crate) fn watch(
        &self,
        name: &'static str,
        stop: CancellationToken,
        task: Task,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        async move {
            match AssertUnwindSafe(task).catch_unwind().await {
                Ok(()) if stop.is_cancelled() => {}
                Ok(()) => this.record(name, "ended before it was asked to stop".to_owned()),
                Err(panic) => {
                    this.record(name, format!("panicked: {}", panic_message(panic.as_ref())))
                }
            }
        }
    }

    /// Records a failure of `task` (only the first one is kept) and wakes [`Self::failed`].
    pub(crate) fn record(&self, task: &'static str, reason: String) {
        tracing::error!(task, reason = %reason, "relay task failed; stopping the relay");
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert((task, reason));
        self.failed.cancel();
    }

    /// Completes when a task has failed.
    pub(crate) async fn failed(&self) {
        self.failed.cancelled().await;
    }

    /// The first failure, if any.
    pub(crate) fn first_failure(&self) -> Option<(&'static str, String)> {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_or_an_early_return_is_a_failure_and_a_stop_is_not() {
        let supervisor = Supervisor::default();
        let stop = CancellationToken::new();
        stop.cancel();
        supervisor.watch("quiet", stop, async {}.boxed()).await;
        assert!(
            supervisor.first_failure().is_none(),
            "a task that was asked to stop"
        );

        supervisor
            .watch("early", CancellationToken::new(), async {}.boxed())
            .await;
        supervisor
            .watch(
                "panicky",
                CancellationToken::new(),
                async { panic!("boom {}", 1) }.boxed(),
            )
            .await;
        supervisor.failed().await;
        let (task, reason) = supervisor.first_failure().expect("a failure");
        assert_eq!(task, "early");
        assert!(reason.contains("before it was asked"), "{reason}");
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let literal: Box<dyn std::any::Any + Send> = Box::new("literal");
        let formatted: Box<dyn std::any::Any + Send> = Box::new(format!("n={}", 2));
        assert_eq!(panic_message(literal.as_ref()), "literal");
        assert_eq!(panic_message(formatted.as_ref()), "n=2");
    }
}
