//! The SVID cache: one current SVID per workload identity, rotated at half-life with +/-10%
//! jitter, per-identity exponential backoff when issuance fails, the old SVID served until it
//! expires, bounded capacity (least recently used identity evicted). Time comes from a
//! [`Clock`] so tests drive it without sleeping.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use super::{
    ca::CertificateAuthority,
    spiffe_id::SpiffeId,
    svid::{DEFAULT_SVID_TTL, SvidError, X509Svid},
};

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Something that issues SVIDs, normally the node's intermediate [`CertificateAuthority`].
pub trait SvidIssuer: Send + Sync {
    /// Issues a fresh SVID for `id` at `now`.
    fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<X509Svid, SvidError>;
}

/// A CA issues SVIDs with the default TTL.
impl SvidIssuer for CertificateAuthority {
    fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<X509Svid, SvidError> {
        self.issue_svid(id, DEFAULT_SVID_TTL, now)
    }
}

/// Why the cache has no usable SVID for an identity.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Issuance failed and there is no unexpired SVID to fall back on.
    #[error("no valid SVID for `{id}`: issuance failed; next attempt at {retry_at:?}")]
    Issue {
        /// The identity.
        id: SpiffeId,
        /// When issuance will be tried again.
        retry_at: SystemTime,
        /// Why issuance failed (boxed: it is large and rare).
        #[source]
        source: Box<SvidError>,
    },
    /// An earlier failure put the identity in backoff and its last SVID has expired.
    #[error("no valid SVID for `{id}`: issuance backing off until {retry_at:?}")]
    BackingOff {
        /// The identity.
        id: SpiffeId,
        /// When issuance will be tried again.
        retry_at: SystemTime,
    },
}

/// Tuning of the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Most identities kept at once.
    pub capacity: usize,
    /// Fraction of an SVID's lifetime after which it is replaced (the half-life: 0.5).
    pub rotate_at: f64,
    /// Relative jitter applied to the rotation point (0.1 = +/-10%).
    pub jitter: f64,
    /// Wait after the first failed issuance; doubled on each further failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 4096,
            rotate_at: 0.5,
            jitter: 0.1,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_mins(5),
        }
    }
}

/// The cached state of one identity.
#[derive(Debug)]
struct Entry {
    svid: Option<Arc<X509Svid>>,
    /// When the current SVID should be replaced.
    rotate_at: SystemTime,
    /// Consecutive failed issuances.
    failures: u32,
    /// No issuance before this time (backoff).
    retry_at: Option<SystemTime>,
    /// Last time the identity was asked for, for eviction.
    last_used: SystemTime,
}

/// What [`SvidCache::refresh_due`] did.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// SVIDs replaced by new ones.
    pub renewed: usize,
    /// Identities that still have no valid SVID, and why.
    pub failed: Vec<(SpiffeId, CacheError)>,
}

/// SVIDs by identity, renewed on demand and by [`SvidCache::refresh_due`].
pub struct SvidCache<C, I> {
    clock: C,
    issuer: I,
    config: CacheConfig,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

impl<C: Clock, I: SvidIssuer> SvidCache<C, I> {
    /// An empty cache issuing through `issuer`, reading time from `clock`.
    pub fn new(clock: C, issuer: I, config: CacheConfig) -> Self {
        Self {
            clock,
            issuer,
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The current SVID for `id`, issuing or rotating it if due. When issuance fails, the
    /// previous SVID is returned as long as it has not expired.
    pub fn get(&self, id: &SpiffeId) -> Result<Arc<X509Svid>, CacheError> {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if !entries.contains_key(id) && entries.len() >= self.config.capacity.max(1) {
            evict_lru(&mut entries);
        }
        let entry = entries.entry(id.clone()).or_insert(Entry {
            svid: None,
            rotate_at: now,
            failures: 0,
            retry_at: None,
            last_used: now,
        });
        entry.last_used = now;
        self.refresh_entry(id, entry, now)
    }

    /// Renews every SVID whose rotation time has passed (and whose backoff is over). A
    /// background task calls this at [`SvidCache::next_deadline`].
    pub fn refresh_due(&self) -> Refreshed {
        let now = self.clock.now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut refreshed = Refreshed::default();
        for (id, entry) in entries.iter_mut() {
            if now < entry.rotate_at {
                continue;
            }
            let before = entry.svid.clone();
            match self.refresh_entry(id, entry, now) {
                Ok(svid) if before.is_none_or(|before| !Arc::ptr_eq(&before, &svid)) => {
                    refreshed.renewed += 1;
                }
                Ok(_) => {}
                Err(error) => refreshed.failed.push((id.clone(), error)),
            }
        }
        refreshed
    }

    /// The earliest time something in the cache needs renewing, if anything is cached.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .values()
            .map(|e| e.retry_at.map_or(e.rotate_at, |r| r.max(e.rotate_at)))
            .min()
    }

    /// The SVIDs held now, without issuing or rotating anything (for status reports).
    pub fn current(&self) -> Vec<Arc<X509Svid>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.values().filter_map(|e| e.svid.clone()).collect()
    }

    /// Forgets `id` (its workload exited or re-executed); returns whether it was cached.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.remove(id).is_some()
    }

    /// Number of identities cached.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the entry's SVID, renewing it first if due and not backing off.
    fn refresh_entry(
        &self,
        id: &SpiffeId,
        entry: &mut Entry,
        now: SystemTime,
    ) -> Result<Arc<X509Svid>, CacheError> {
        let valid = entry
            .svid
            .as_ref()
            .filter(|svid| now < svid.not_after())
            .cloned();
        if let Some(svid) = &valid
            && now < entry.rotate_at
        {
            return Ok(Arc::clone(svid));
        }
        if let Some(retry_at) = entry.retry_at.filter(|&r| now < r) {
            return valid.ok_or_else(|| CacheError::BackingOff {
                id: id.clone(),
                retry_at,
            });
        }
        match self.issuer.issue(id, now) {
            Ok(svid) => {
                entry.rotate_at = self.rotation_time(&svid, now);
                entry.failures = 0;
                entry.retry_at = None;
                let svid = Arc::new(svid);
                entry.svid = Some(Arc::clone(&svid));
                Ok(svid)
            }
            Err(source) => {
                entry.failures = entry.failures.saturating_add(1);
                let retry_at = now + self.backoff(entry.failures);
                entry.retry_at = Some(retry_at);
                valid.ok_or_else(|| CacheError::Issue {
                    id: id.clone(),
                    retry_at,
                    source: Box::new(source),
                })
            }
        }
    }

    /// `rotate_at` of the lifetime left at issuance (`issued` to `not_after`: the 60 s of
    /// backdating are not life the SVID has ahead of it, and would make a short-lived SVID due
    /// at once), moved by a random +/-`jitter` fraction of that point.
    fn rotation_time(&self, svid: &X509Svid, issued: SystemTime) -> SystemTime {
        let start = issued.max(svid.not_before());
        let lifetime = svid
            .not_after()
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        let jitter = self.config.jitter.abs();
        let factor = if jitter > 0.0 {
            rand::random_range(-jitter..=jitter)
        } else {
            0.0
        };
        let point = lifetime.mul_f64((self.config.rotate_at * (1.0 + factor)).clamp(0.0, 1.0));
        start + point
    }

    /// Backoff after `failures` consecutive failures: initial * 2^(failures-1), capped.
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.config
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.config.max_backoff)
    }
}

/// Drops the least recently used entry.
fn evict_lru(entries: &mut HashMap<SpiffeId, Entry>) {
    if let Some(oldest) = entries
        .iter()
        .min_by_key(|(_, e)| e.last_used)
        .map(|(id, _)| id.clone())
    {
        entries.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;
    use crate::identity::ca::{CaError, DEFAULT_ROOT_VALIDITY};

    /// A clock the test moves by hand.
    struct TestClock(Mutex<SystemTime>);

    impl TestClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().expect("clock") += by;
        }
    }

    impl Clock for Arc<TestClock> {
        fn now(&self) -> SystemTime {
            *self.0.lock().expect("clock")
        }
    }

    /// Issues through a real CA unless told to fail; counts attempts.
    struct FlakyIssuer {
        ca: CertificateAuthority,
        fail: AtomicBool,
        attempts: AtomicU32,
    }

    impl SvidIssuer for Arc<FlakyIssuer> {
        fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<X509Svid, SvidError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(SvidError::Ca(CaError::Expired {
                    trust_domain: self.ca.trust_domain().clone(),
                }));
            }
            self.ca.issue(id, now)
        }
    }

    const HOUR: Duration = Duration::from_hours(1);

    type TestCache = SvidCache<Arc<TestClock>, Arc<FlakyIssuer>>;

    fn setup(config: CacheConfig) -> (Arc<TestClock>, Arc<FlakyIssuer>, TestCache) {
        // A whole second, so certificate times and clock times compare exactly.
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let td = "example.org".parse().expect("td");
        let ca = CertificateAuthority::new_root(
            &td,
            DEFAULT_ROOT_VALIDITY,
            start - Duration::from_secs(10),
        )
        .expect("root");
        let clock = Arc::new(TestClock(Mutex::new(start)));
        let issuer = Arc::new(FlakyIssuer {
            ca,
            fail: AtomicBool::new(false),
            attempts: AtomicU32::new(0),
        });
        let cache = SvidCache::new(Arc::clone(&clock), Arc::clone(&issuer), config);
        (clock, issuer, cache)
    }

    fn id(path: &str) -> SpiffeId {
        format!("spiffe://example.org/{path}").parse().expect("id")
    }

    #[test]
    fn rotates_at_half_life_within_jitter() {
        let (clock, issuer, cache) = setup(CacheConfig::default());
        let first = cache.get(&id("web")).expect("issued");
        // The life ahead at issuance is 1 h (the 60 s of backdating are behind it); the rotation
        // point is 50% +/- 10% of it from issuance: between 1620 s and 1980 s after start.
        clock.advance(Duration::from_secs(1610));
        assert!(Arc::ptr_eq(&first, &cache.get(&id("web")).expect("cached")));
        assert_eq!(issuer.attempts.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(1990 - 1610));
        let second = cache.get(&id("web")).expect("rotated");
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(issuer.attempts.load(Ordering::SeqCst), 2);
        assert_eq!(cache.len(), 1);
    }

    /// Issues SVIDs valid for ten seconds through the test issuer's CA.
    struct ShortLived(Arc<FlakyIssuer>);

    impl SvidIssuer for ShortLived {
        fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<X509Svid, SvidError> {
            self.0.ca.issue_svid(id, Duration::from_secs(10), now)
        }
    }

    #[test]
    fn a_short_lived_svid_rotates_at_half_its_life_not_at_once() {
        let (clock, issuer, _) = setup(CacheConfig::default());
        let config = CacheConfig {
            jitter: 0.0,
            ..CacheConfig::default()
        };
        let cache = SvidCache::new(Arc::clone(&clock), ShortLived(issuer), config);
        let first = cache.get(&id("web")).expect("issued");
        assert_eq!(
            cache.next_deadline().expect("one entry"),
            clock.now() + Duration::from_secs(5)
        );
        clock.advance(Duration::from_secs(4));
        assert_eq!(cache.refresh_due().renewed, 0, "not due yet");
        clock.advance(Duration::from_secs(1));
        assert_eq!(cache.refresh_due().renewed, 1, "due at half its life");
        assert!(!Arc::ptr_eq(
            &first,
            &cache.get(&id("web")).expect("renewed")
        ));
    }

    #[test]
    fn jitter_spreads_rotation_times() {
        let (_, _, cache) = setup(CacheConfig::default());
        for i in 0..50 {
            cache.get(&id(&format!("w{i}"))).expect("issued");
        }
        let entries = cache.entries.lock().expect("lock");
        let mut points: Vec<_> = entries.values().map(|e| e.rotate_at).collect();
        points.sort();
        points.dedup();
        assert!(
            points.len() > 1,
            "50 rotation times should not all coincide"
        );
    }

    #[test]
    fn failures_back_off_exponentially_and_serve_the_old_svid_until_expiry() {
        let config = CacheConfig {
            jitter: 0.0,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(40),
            ..CacheConfig::default()
        };
        let (clock, issuer, cache) = setup(config);
        let web = id("web");
        let first = cache.get(&web).expect("issued");
        issuer.fail.store(true, Ordering::SeqCst);
        clock.advance(HOUR / 2);
        // Due for rotation, issuance fails: the old SVID is still served.
        assert!(Arc::ptr_eq(&first, &cache.get(&web).expect("old one")));
        assert_eq!(issuer.attempts.load(Ordering::SeqCst), 2);
        // Within the 10 s backoff nothing is attempted.
        clock.advance(Duration::from_secs(9));
        cache.get(&web).expect("old one");
        assert_eq!(issuer.attempts.load(Ordering::SeqCst), 2);
        // Then 10 s, 20 s, 40 s, 40 s (capped) between attempts.
        for wait in [1, 20, 40, 40] {
            clock.advance(Duration::from_secs(wait));
            let before = issuer.attempts.load(Ordering::SeqCst);
            cache.get(&web).expect("old one");
            assert_eq!(
                issuer.attempts.load(Ordering::SeqCst),
                before + 1,
                "after {wait}s"
            );
        }
        // Once the old SVID has expired, callers get an error naming the next attempt.
        clock.advance(HOUR);
        let err = cache.get(&web).expect_err("expired and failing");
        assert!(matches!(err, CacheError::Issue { .. }), "{err:?}");
        let err = cache.get(&web).expect_err("backing off");
        assert!(matches!(err, CacheError::BackingOff { .. }), "{err:?}");
        // Recovery resets the backoff.
        issuer.fail.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(40));
        let fresh = cache.get(&web).expect("recovered");
        assert!(!Arc::ptr_eq(&first, &fresh));
    }

    #[test]
    fn backoff_is_per_identity() {
        let (clock, issuer, cache) = setup(CacheConfig::default());
        issuer.fail.store(true, Ordering::SeqCst);
        cache.get(&id("a")).expect_err("fails");
        issuer.fail.store(false, Ordering::SeqCst);
        // `a` is backing off, `b` is not.
        cache.get(&id("a")).expect_err("backing off");
        cache.get(&id("b")).expect("b issues");
        clock.advance(Duration::from_secs(1));
        cache.get(&id("a")).expect("a retries after its backoff");
    }

    #[test]
    fn capacity_evicts_the_least_recently_used_identity() {
        let config = CacheConfig {
            capacity: 2,
            ..CacheConfig::default()
        };
        let (clock, _, cache) = setup(config);
        cache.get(&id("a")).expect("a");
        clock.advance(Duration::from_secs(1));
        cache.get(&id("b")).expect("b");
        clock.advance(Duration::from_secs(1));
        cache.get(&id("a")).expect("a again");
        clock.advance(Duration::from_secs(1));
        cache.get(&id("c")).expect("c");
        assert_eq!(cache.len(), 2);
        assert!(!cache.remove(&id("b")), "b was least recently used");
        assert!(cache.remove(&id("a")));
    }

    #[test]
    fn refresh_due_renews_in_the_background() {
        let config = CacheConfig {
            jitter: 0.0,
            ..CacheConfig::default()
        };
        let (clock, issuer, cache) = setup(config);
        let first = cache.get(&id("web")).expect("issued");
        let deadline = cache.next_deadline().expect("one entry");
        assert_eq!(deadline, first.not_before() + Duration::from_mins(31));
        let refreshed = cache.refresh_due();
        assert_eq!((refreshed.renewed, refreshed.failed.len()), (0, 0));
        assert_eq!(issuer.attempts.load(Ordering::SeqCst), 1);
        clock.advance(deadline.duration_since(clock.now()).expect("future"));
        let refreshed = cache.refresh_due();
        assert_eq!((refreshed.renewed, refreshed.failed.len()), (1, 0));
        assert_eq!(issuer.attempts.load(Ordering::SeqCst), 2);
        assert!(!Arc::ptr_eq(
            &first,
            &cache.get(&id("web")).expect("renewed")
        ));
    }
}
