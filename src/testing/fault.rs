//! Fault injection: scripted one-shot faults and seeded random faults.
//!
//! Every request that reaches a route of the fake (a known bucket, a well-formed request) is
//! offered to the fault plan **after** its body has been read and validated and **before** the
//! store is touched. The plan answers with at most one [`Fault`]:
//!
//! 1. the first queued [`FaultRule`] (in injection order) whose filters match the request is
//!    removed from the queue and applied;
//! 2. otherwise, if random faults are on ([`FakeGcs::set_fault_rate`]) and the request is a
//!    mutation (`POST`, `PATCH`, `DELETE`), or a read and reads are included
//!    ([`FakeGcs::set_read_faults`]), a fault is drawn with the configured probability from the
//!    configured kinds.
//!
//! Malformed requests (answered 400/404/405/413 by the router) never consume a fault.
//!
//! [`FakeGcs::set_fault_rate`]: super::FakeGcs::set_fault_rate
//! [`FakeGcs::set_read_faults`]: super::FakeGcs::set_read_faults

use std::collections::VecDeque;
use std::time::Duration;

use http::Method;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A failure the fake server can inject into one request.
///
/// "Commit" means the request takes effect in the store exactly as it would without the fault
/// (a read simply reads). The variants model the ways a real request can go wrong:
///
/// | variant | store | the client sees |
/// |---|---|---|
/// | [`FailBefore(s)`](Fault::FailBefore) | untouched | status `s` with a GCS error body |
/// | [`CommitThen(s)`](Fault::CommitThen) | committed | status `s` with a GCS error body |
/// | [`CommitThenDrop`](Fault::CommitThenDrop) | committed | the connection closes, no response |
/// | [`Delay(d)`](Fault::Delay) | committed after `d` | the normal response, `d` late |
/// | [`CommitThenDelay(d)`](Fault::CommitThenDelay) | committed at once | the normal response, `d` late |
///
/// A request is handled to the end even if the client gives up meanwhile: a
/// [`Delay`](Fault::Delay) longer than the client's timeout is a write that lands after the
/// client saw a timeout, as a slow request on GCS can. Dropping the [`FakeGcs`] abandons
/// requests still waiting.
///
/// Error statuses map to GCS reasons: 400 `invalid`, 404 `notFound`, 408 `requestTimeout`,
/// 412 `conditionNotMet`, 429 `rateLimitExceeded`, 5xx `backendError`. A status outside
/// 100..=999 is answered as 500.
///
/// [`FakeGcs`]: super::FakeGcs
///
/// ```
/// use dimutex::testing::Fault;
/// use std::time::Duration;
///
/// let faults = [
///     Fault::FailBefore(503),
///     Fault::CommitThen(503),
///     Fault::CommitThenDrop,
///     Fault::Delay(Duration::from_millis(200)),
///     Fault::CommitThenDelay(Duration::from_secs(2)),
/// ];
/// assert!(!faults[0].commits_before_reply());
/// assert!(faults[1].commits_before_reply());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// Answer this status (e.g. 503 or 429) without touching the store.
    FailBefore(u16),
    /// Perform the request, then answer this status (e.g. 503) instead of the real response.
    CommitThen(u16),
    /// Perform the request, then close the connection without sending any response; the
    /// client sees a connection error (e.g. "connection closed before message completed").
    CommitThenDrop,
    /// Wait this long, then handle the request normally.
    Delay(Duration),
    /// Perform the request at once, then wait this long before sending the normal response.
    CommitThenDelay(Duration),
}

impl Fault {
    /// Whether the request takes effect before the client hears anything: true for
    /// [`CommitThen`](Fault::CommitThen), [`CommitThenDrop`](Fault::CommitThenDrop) and
    /// [`CommitThenDelay`](Fault::CommitThenDelay) — the faults that make a write *ambiguous*
    /// for the client.
    ///
    /// ```
    /// use dimutex::testing::Fault;
    /// assert!(Fault::CommitThenDrop.commits_before_reply());
    /// assert!(!Fault::FailBefore(429).commits_before_reply());
    /// ```
    #[must_use]
    pub fn commits_before_reply(&self) -> bool {
        matches!(
            self,
            Fault::CommitThen(_) | Fault::CommitThenDrop | Fault::CommitThenDelay(_)
        )
    }
}

/// A scripted one-shot fault: applies [`Fault`] to the next request that matches its filters,
/// then is used up. Queue rules with [`FakeGcs::inject`](super::FakeGcs::inject).
///
/// Without filters a rule matches any request; [`with_method`](FaultRule::with_method) and
/// [`with_object`](FaultRule::with_object) narrow it. A [`Fault`] converts into a rule that
/// matches anything.
///
/// ```
/// use dimutex::testing::{Fault, FaultRule};
/// use http::Method;
///
/// let rule = FaultRule::new(Fault::CommitThenDrop)
///     .with_method(Method::DELETE)
///     .with_object("locks/report");
/// assert_eq!(rule.method(), Some(&Method::DELETE));
/// assert_eq!(rule.object(), Some("locks/report"));
/// assert_eq!(FaultRule::from(Fault::FailBefore(503)).method(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct FaultRule {
    fault: Fault,
    method: Option<Method>,
    object: Option<String>,
}

impl FaultRule {
    /// A rule applying `fault` to the next request, whatever it is.
    ///
    /// ```
    /// use dimutex::testing::{Fault, FaultRule};
    /// let rule = FaultRule::new(Fault::FailBefore(503));
    /// assert_eq!(rule.fault(), &Fault::FailBefore(503));
    /// ```
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            method: None,
            object: None,
        }
    }

    /// Only requests with this HTTP method match (`POST` is an upload, `GET` a read or a list,
    /// `PATCH` a metadata update, `DELETE` a delete).
    ///
    /// ```
    /// use dimutex::testing::{Fault, FaultRule};
    /// let rule = FaultRule::new(Fault::CommitThen(503)).with_method(http::Method::PATCH);
    /// assert_eq!(rule.method(), Some(&http::Method::PATCH));
    /// ```
    pub fn with_method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Only requests about this object name (decoded, as stored) match. Lists and bucket reads
    /// name no object and never match such a rule.
    ///
    /// ```
    /// use dimutex::testing::{Fault, FaultRule};
    /// let rule = FaultRule::new(Fault::CommitThenDrop).with_object("a/b");
    /// assert_eq!(rule.object(), Some("a/b"));
    /// ```
    pub fn with_object(mut self, name: impl Into<String>) -> Self {
        self.object = Some(name.into());
        self
    }

    /// The fault this rule injects.
    ///
    /// ```
    /// use dimutex::testing::{Fault, FaultRule};
    /// assert_eq!(FaultRule::new(Fault::CommitThenDrop).fault(), &Fault::CommitThenDrop);
    /// ```
    #[must_use]
    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    /// The method filter, if any.
    ///
    /// ```
    /// use dimutex::testing::{Fault, FaultRule};
    /// assert_eq!(FaultRule::new(Fault::CommitThenDrop).method(), None);
    /// ```
    #[must_use]
    pub fn method(&self) -> Option<&Method> {
        self.method.as_ref()
    }

    /// The object-name filter, if any.
    ///
    /// ```
    /// use dimutex::testing::{Fault, FaultRule};
    /// assert_eq!(FaultRule::new(Fault::CommitThenDrop).object(), None);
    /// ```
    #[must_use]
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    fn matches(&self, method: &Method, object: Option<&str>) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && self.object.as_deref().is_none_or(|o| Some(o) == object)
    }
}

impl From<Fault> for FaultRule {
    fn from(fault: Fault) -> Self {
        FaultRule::new(fault)
    }
}

#[derive(Debug)]
struct RandomFaults {
    rate: f64,
    kinds: Vec<Fault>,
    rng: StdRng,
}

/// The scripted queue, the random configuration and the injection count.
#[derive(Debug, Default)]
pub(crate) struct FaultPlan {
    queue: VecDeque<FaultRule>,
    random: Option<RandomFaults>,
    include_reads: bool,
    injected: u64,
}

impl FaultPlan {
    pub(crate) fn push(&mut self, rule: FaultRule) {
        self.queue.push_back(rule);
    }

    pub(crate) fn pending(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn injected(&self) -> u64 {
        self.injected
    }

    pub(crate) fn set_random(&mut self, rate: f64, kinds: Vec<Fault>, seed: u64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.random = (rate > 0.0 && !kinds.is_empty()).then(|| RandomFaults {
            rate,
            kinds,
            rng: StdRng::seed_from_u64(seed),
        });
    }

    pub(crate) fn set_include_reads(&mut self, on: bool) {
        self.include_reads = on;
    }

    /// Clears the queue and turns random faults off; keeps the count.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.random = None;
    }

    /// The fault to apply to this request, if any (and counts it).
    pub(crate) fn pick(&mut self, method: &Method, object: Option<&str>) -> Option<Fault> {
        let fault = self
            .pick_scripted(method, object)
            .or_else(|| self.pick_random(method));
        if fault.is_some() {
            self.injected += 1;
        }
        fault
    }

    fn pick_scripted(&mut self, method: &Method, object: Option<&str>) -> Option<Fault> {
        let index = self.queue.iter().position(|r| r.matches(method, object))?;
        self.queue.remove(index).map(|r| r.fault)
    }

    fn pick_random(&mut self, method: &Method) -> Option<Fault> {
        let eligible = is_mutation(method) || self.include_reads;
        let random = self.random.as_mut().filter(|_| eligible)?;
        if random.rng.random::<f64>() >= random.rate {
            return None;
        }
        let index = random.rng.random_range(0..random.kinds.len());
        Some(random.kinds[index].clone())
    }
}

/// Whether a request with this method changes the store.
pub(crate) fn is_mutation(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PATCH | Method::DELETE | Method::PUT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_rules_are_fifo_and_filtered() {
        let mut plan = FaultPlan::default();
        plan.push(FaultRule::new(Fault::FailBefore(503)).with_method(Method::DELETE));
        plan.push(FaultRule::new(Fault::CommitThenDrop));
        plan.push(FaultRule::new(Fault::FailBefore(429)).with_object("x"));
        assert_eq!(
            plan.pick(&Method::GET, Some("y")),
            Some(Fault::CommitThenDrop)
        );
        assert_eq!(plan.pick(&Method::GET, Some("y")), None);
        assert_eq!(
            plan.pick(&Method::GET, Some("x")),
            Some(Fault::FailBefore(429))
        );
        assert_eq!(
            plan.pick(&Method::DELETE, None),
            Some(Fault::FailBefore(503))
        );
        assert_eq!(plan.pending(), 0);
        assert_eq!(plan.injected(), 3);
    }

    #[test]
    fn random_faults_are_seeded_and_skip_reads_by_default() {
        let draw = |seed| {
            let mut plan = FaultPlan::default();
            plan.set_random(
                0.5,
                vec![Fault::FailBefore(503), Fault::CommitThenDrop],
                seed,
            );
            (0..64)
                .map(|_| plan.pick(&Method::POST, None))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        let hits = a.iter().filter(|f| f.is_some()).count();
        assert!((10..=54).contains(&hits), "{hits}");

        let mut plan = FaultPlan::default();
        plan.set_random(1.0, vec![Fault::FailBefore(503)], 1);
        assert_eq!(plan.pick(&Method::GET, None), None);
        plan.set_include_reads(true);
        assert_eq!(plan.pick(&Method::GET, None), Some(Fault::FailBefore(503)));
        plan.set_random(f64::NAN, vec![Fault::FailBefore(503)], 1);
        assert_eq!(plan.pick(&Method::POST, None), None);
    }
}
