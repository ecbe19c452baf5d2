//! Opaque list page tokens (AIP-158): the cursor and a fingerprint of the query that made
//! it, signed with HMAC-SHA256, so a forged, truncated or reused-with-another-filter token
//! is refused instead of silently listing something else.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

const MAC_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("is not a page token issued by this service")]
    Malformed,
    #[error("was issued for a different query; send the same filters as the first page")]
    QueryChanged,
}

#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
}

impl PageTokens {
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// A key nobody else knows: tokens then work only within this process.
    pub fn random() -> Self {
        let key: [u8; 32] = rand::random();
        Self::new(&key)
    }

    fn mac(&self, payload: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .expect("hmac accepts keys of any length");
        mac.update(payload);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    /// `query` identifies the list call and its filters (not the page size, which may change
    /// between pages).
    pub fn encode<C: Serialize>(&self, query: &str, cursor: &C) -> String {
        let payload = serde_json::to_vec(&(query, cursor)).expect("cursors serialise");
        let mut bytes = payload.clone();
        bytes.extend_from_slice(&self.mac(&payload));
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode<C: DeserializeOwned>(&self, query: &str, token: &str) -> Result<C, TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() <= MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let expected = self.mac(payload);
        // Constant-time comparison: a token is a capability to resume a listing.
        let diff = expected
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(TokenError::Malformed);
        }
        let (token_query, cursor): (String, C) =
            serde_json::from_slice(payload).map_err(|_| TokenError::Malformed)?;
        if token_query != query {
            return Err(TokenError::QueryChanged);
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let tokens = PageTokens::new(b"key");
        let token = tokens.encode("q1", &("acme", 7));
        assert_eq!(
            tokens.decode::<(String, u32)>("q1", &token).unwrap(),
            ("acme".into(), 7)
        );
        assert_eq!(
            tokens.decode::<(String, u32)>("q2", &token),
            Err(TokenError::QueryChanged)
        );
        let truncated = &token[..token.len() - 3];
        assert_eq!(
            tokens.decode::<(String, u32)>("q1", truncated),
            Err(TokenError::Malformed)
        );
        // Re-signing with another key is a forgery.
        let forged = PageTokens::new(b"other").encode("q1", &("acme", 0));
        assert_eq!(
            tokens.decode::<(String, u32)>("q1", &forged),
            Err(TokenError::Malformed)
        );
        for junk in ["", "!!!", "AAAA"] {
            assert_eq!(
                tokens.decode::<(String, u32)>("q1", junk),
                Err(TokenError::Malformed)
            );
        }
    }
}
