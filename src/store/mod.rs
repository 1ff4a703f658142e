//! State that survives restarts (placeholder handle until the embedded store lands).

/// Handle to the state store; cheap to clone.
#[derive(Clone, Default)]
pub struct Store {}

impl Store {
    /// Resolves once every change handed to the store before this call is durable.
    pub async fn sync(&self) {}
}
