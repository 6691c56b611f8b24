//! Cleaning up after an acquisition that was abandoned (its future dropped, or an error
//! returned) while a write of it may have landed: read the object, and delete it,
//! conditionally, if it carries our owner id.

use super::Protocol;
use crate::backend::{BackendError, Reply};
use crate::object;

/// How many times the object is read while it is absent or another's: a write whose future
/// was dropped may still be on its way to the server, and land once the object is gone.
const LOOKS: usize = 2;

/// Deletes `name` if `owner` (one acquisition's owner id, never reused) holds it. Gives up
/// after the retry policy's budget: expiry then frees the lock.
pub(crate) async fn clean_up(p: &Protocol, name: &str, owner: &str) {
    for look in 1..=LOOKS {
        let read = p.send_within_policy(|| p.backend().inspect(name)).await;
        let state = match read.result.map(Reply::into_value) {
            Ok(Some(state)) if object::owner_of(&state) == Some(owner) => state,
            Ok(_) if look < LOOKS => {
                tokio::time::sleep(p.settings().request_timeout).await;
                continue;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(target: "dimutex", error = %e, "clean-up read failed; the lock will expire");
                return;
            }
        };
        let version = state.version();
        let deleted = p
            .send_within_policy(|| p.backend().release(name, version))
            .await;
        match deleted.result {
            Ok(_) | Err(BackendError::NotFound) => {
                tracing::debug!(target: "dimutex", "cleaned up the lock of an abandoned acquisition");
            }
            Err(e) => {
                tracing::debug!(target: "dimutex", error = %e, "clean-up delete failed; the lock will expire");
            }
        }
        return;
    }
}
