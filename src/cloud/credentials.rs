//! A credentials cache for assumed-role sessions: the session is assumed once, shared by
//! every client of an environment, and assumed again a safety margin before it expires (so
//! no request ever goes out with credentials about to lapse). When a refresh fails while
//! the cached session is still valid, the cached one is used and the refresh is tried again
//! on the next request.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials, SharedCredentialsProvider, future};

/// The wall clock, replaceable in tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// How long assuming the role may take. Requests wait for a refresh in progress, so an STS
/// call that hangs must not hold them forever.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RefreshingCredentials {
    inner: SharedCredentialsProvider,
    margin: Duration,
    load_timeout: Duration,
    clock: Clock,
    /// Named in logs (environment and session), never the credentials.
    label: String,
    cached: tokio::sync::Mutex<Option<Credentials>>,
}

impl fmt::Debug for RefreshingCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingCredentials")
            .field("label", &self.label)
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

impl RefreshingCredentials {
    /// Caches what `inner` provides and asks it again `margin` before expiry.
    pub fn new(
        inner: SharedCredentialsProvider,
        margin: Duration,
        label: impl Into<String>,
    ) -> Self {
        Self {
            inner,
            margin,
            load_timeout: LOAD_TIMEOUT,
            clock: Arc::new(SystemTime::now),
            label: label.into(),
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The same cache giving up on a refresh after `timeout` (30 s unless set).
    pub fn with_load_timeout(mut self, timeout: Duration) -> Self {
        self.load_timeout = timeout;
        self
    }

    /// The same cache reading time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Whether `credentials` can still be handed out without a refresh.
    fn fresh(&self, credentials: &Credentials, now: SystemTime) -> bool {
        credentials
            .expiry()
            .is_none_or(|expiry| expiry > now + self.margin)
    }

    async fn credentials(&self) -> provider::Result {
        // One refresh at a time: concurrent requests wait for it instead of each assuming
        // the role.
        let mut cached = self.cached.lock().await;
        let now = (self.clock)();
        if let Some(credentials) = cached.as_ref()
            && self.fresh(credentials, now)
        {
            return Ok(credentials.clone());
        }
        let loaded =
            match tokio::time::timeout(self.load_timeout, self.inner.provide_credentials()).await {
                Ok(loaded) => loaded,
                Err(_) => Err(provider::error::CredentialsError::provider_timed_out(
                    self.load_timeout,
                )),
            };
        match loaded {
            Ok(credentials) => {
                let expires_in = credentials
                    .expiry()
                    .and_then(|expiry| expiry.duration_since(now).ok())
                    .map(|left| left.as_secs());
                tracing::debug!(session = %self.label, expires_in_secs = ?expires_in, "role session assumed");
                *cached = Some(credentials.clone());
                Ok(credentials)
            }
            Err(error) => match cached.as_ref() {
                Some(credentials) if credentials.expiry().is_none_or(|expiry| expiry > now) => {
                    tracing::warn!(session = %self.label, %error, "cannot refresh the role session; using the current one until it expires");
                    Ok(credentials.clone())
                }
                _ => Err(error),
            },
        }
    }
}

impl ProvideCredentials for RefreshingCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.credentials())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Hands out numbered credentials valid for 15 minutes from the shared clock, or fails.
    #[derive(Debug)]
    struct Numbered {
        now: Arc<Mutex<SystemTime>>,
        issued: Arc<AtomicU32>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        hang: Arc<std::sync::atomic::AtomicBool>,
    }

    impl ProvideCredentials for Numbered {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            if self.hang.load(Ordering::SeqCst) {
                return future::ProvideCredentials::new(std::future::pending());
            }
            if self.fail.load(Ordering::SeqCst) {
                return future::ProvideCredentials::ready(Err(
                    provider::error::CredentialsError::provider_error("sts is down"),
                ));
            }
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let expiry = *self.now.lock().unwrap() + Duration::from_secs(900);
            future::ProvideCredentials::ready(Ok(Credentials::new(
                format!("AKID{n}"),
                "secret",
                None,
                Some(expiry),
                "numbered",
            )))
        }
    }

    #[tokio::test]
    async fn refreshes_inside_the_margin_and_keeps_a_valid_session_when_refresh_fails() {
        let now = Arc::new(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        ));
        let issued = Arc::new(AtomicU32::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let inner = Numbered {
            now: now.clone(),
            issued: issued.clone(),
            fail: fail.clone(),
            hang: Arc::default(),
        };
        let clock = now.clone();
        let cache = RefreshingCredentials::new(
            SharedCredentialsProvider::new(inner),
            Duration::from_secs(300),
            "test",
        )
        .with_clock(Arc::new(move || *clock.lock().unwrap()));
        let key = |c: Credentials| c.access_key_id().to_owned();
        assert_eq!(key(cache.provide_credentials().await.unwrap()), "AKID1");
        *now.lock().unwrap() += Duration::from_secs(599);
        assert_eq!(key(cache.provide_credentials().await.unwrap()), "AKID1");
        *now.lock().unwrap() += Duration::from_secs(2);
        assert_eq!(key(cache.provide_credentials().await.unwrap()), "AKID2");
        // STS down inside the margin: the still-valid session is kept…
        fail.store(true, Ordering::SeqCst);
        *now.lock().unwrap() += Duration::from_secs(700);
        assert_eq!(key(cache.provide_credentials().await.unwrap()), "AKID2");
        // …but never past its expiry.
        *now.lock().unwrap() += Duration::from_secs(300);
        assert!(cache.provide_credentials().await.is_err());
        fail.store(false, Ordering::SeqCst);
        assert_eq!(key(cache.provide_credentials().await.unwrap()), "AKID3");
        assert_eq!(issued.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_hanging_sts_call_times_out_instead_of_blocking_every_request() {
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let inner = Numbered {
            now: Arc::new(Mutex::new(SystemTime::now())),
            issued: Arc::default(),
            fail: Arc::default(),
            hang: hang.clone(),
        };
        let cache = RefreshingCredentials::new(
            SharedCredentialsProvider::new(inner),
            Duration::from_secs(300),
            "test",
        )
        .with_load_timeout(Duration::from_millis(50));
        let error = cache.provide_credentials().await.unwrap_err();
        assert!(
            matches!(
                error,
                provider::error::CredentialsError::ProviderTimedOut(_)
            ),
            "{error:?}"
        );
        hang.store(false, Ordering::SeqCst);
        assert!(cache.provide_credentials().await.is_ok());
    }
}
