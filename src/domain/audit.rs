//! The audit trail: one record per mutating call, allowed or refused.

use serde::{Deserialize, Serialize};

use super::{TenantId, Timestamp};

/// One mutating call as it was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unique (a random UUID); with `time` it orders events that share a millisecond.
    pub id: String,
    /// When the call was answered.
    pub time: Timestamp,
    /// The tenant the target belongs to, when it could be told; the tenant whose admins
    /// see the event.
    pub tenant: Option<TenantId>,
    /// The principal's subject (never a credential).
    pub principal: String,
    /// The full gRPC method path.
    pub method: String,
    /// The resource the call named, as given (bounded in length).
    pub target: String,
    /// The `x-request-id` of the call (the client's or the generated one).
    pub request_id: String,
    /// The canonical code it ended with (`OK`, `PERMISSION_DENIED`, ...).
    pub outcome: String,
    /// The operation it started or returned, if any (`operations/{id}`).
    pub operation: Option<String>,
    /// After this instant the event is gone (DynamoDB TTL; readers skip it before).
    pub expires_at: Timestamp,
}

/// Longest target or request id kept in an event.
pub const MAX_AUDIT_TEXT: usize = 256;

/// `text` cut to [`MAX_AUDIT_TEXT`] bytes at a character boundary.
pub fn audit_text(text: &str) -> String {
    let mut end = text.len().min(MAX_AUDIT_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let long = "é".repeat(200);
        let cut = audit_text(&long);
        assert!(cut.len() <= MAX_AUDIT_TEXT);
        assert!(long.starts_with(&cut));
        assert_eq!(audit_text("tenants/acme"), "tenants/acme");
    }
}
