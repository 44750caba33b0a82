//! Supervision of the consumer's tasks: which one ended, and why.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::JoinSet;

use super::call::panic_message;

/// The tasks of a running consumer, by name, so that one that ends can be named.
#[derive(Default)]
pub(super) struct Supervised {
    tasks: JoinSet<()>,
    names: HashMap<tokio::task::Id, String>,
}

/// A task that ended: its name, and `Err` with why if it did not return normally.
pub(super) struct Ended {
    name: String,
    result: Result<(), String>,
}

impl Supervised {
    pub(super) fn spawn(&mut self, name: String, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, or `None` when none is left. Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<Ended> {
        let (id, result) = match self.tasks.join_next_with_id().await? {
            Ok((id, ())) => (id, Ok(())),
            Err(e) if e.is_panic() => (
                e.id(),
                Err(format!(
                    "panicked: {}",
                    panic_message(e.into_panic().as_ref())
                )),
            ),
            Err(e) => (e.id(), Err("was cancelled".to_owned())),
        };
        let name = self
            .names
            .remove(&id)
            .unwrap_or_else(|| format!("task {id}"));
        Some(Ended { name, result })
    }
}

impl Ended {
    /// Why it ended, for a task that ended before shutdown was asked (always a failure).
    pub(super) fn before_shutdown(self) -> String {
        match self.result {
            Ok(()) => format!("{} ended before shutdown", self.name),
            Err(why) => format!("{} {why}", self.name),
        }
    }

    /// Why it failed, for a task that ended after it was told to stop (`None` if it
    /// returned normally).
    pub(super) fn failure(self) -> Option<String> {
        self.result.err().map(|why| format!("{} {why}", self.name))
    }
}
