//! An in-process object store with the documented GCS semantics the lock relies on:
//! generations, metagenerations, all four preconditions on every write, `updated`, a server
//! clock, and an optional one-mutation-per-second throttle per object name.
//!
//! [`MemoryBackend`](super::MemoryBackend) and the fake GCS server of the `testing` feature are
//! two fronts on this one model, so they cannot drift apart.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::Metadata;

/// The four GCS preconditions. `if_generation_match == Some(0)` means "no live object".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Preconditions {
    pub if_generation_match: Option<i64>,
    pub if_generation_not_match: Option<i64>,
    pub if_metageneration_match: Option<i64>,
    pub if_metageneration_not_match: Option<i64>,
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredObject {
    pub name: String,
    pub generation: i64,
    pub metageneration: i64,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub metadata: Metadata,
    pub cache_control: Option<Cow<'static, str>>,
    pub content_type: Option<Cow<'static, str>>,
    pub data: Cow<'static, [u8]>,
}

/// Why a store operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreError {
    NotFound,
    PreconditionFailed,
    /// A read's `if*NotMatch` precondition failed (HTTP 304).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    NotModified,
    RateLimited,
}

/// A metadata change: `None` removes the key (JSON `null` in a PATCH).
pub(crate) type MetadataPatch = Vec<(String, Option<String>)>;

/// The objects of the bucket.
#[derive(Debug, Default)]
struct Inner {
    /// Sorted by name, as GCS lists them; shared with the replies that carry them.
    objects: BTreeMap<String, Arc<StoredObject>>,
    last_mutation: HashMap<String, Instant>,
    /// Generations are per name on GCS; one counter for all keeps each name's increasing.
    last_generation: i64,
    /// Reads and writes served, refused ones included.
    operations: u64,
}

impl Inner {
    /// The live object named `name`, if any.
    fn object(&self, name: &str) -> Option<&StoredObject> {
        self.objects.get(name).map(Arc::as_ref)
    }
}

/// The object store of one bucket.
#[derive(Debug, Default)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
    throttle: AtomicBool,
    clock_offset_ms: AtomicI64,
    origin: Origin,
}

/// When the store was made, on the wall clock and on [`crate::clock`]: the server clock is
/// the first moved on by the second, so paused test time moves it too.
#[derive(Debug)]
struct Origin {
    wall: SystemTime,
    at: Instant,
}

impl Default for Origin {
    fn default() -> Self {
        Self {
            wall: SystemTime::now(),
            at: crate::clock::now(),
        }
    }
}

/// The minimum spacing of mutations of one object name when the throttle is on.
pub(crate) const MUTATION_SPACING: Duration = Duration::from_secs(1);

impl Store {
    pub fn set_throttle(&self, on: bool) {
        self.throttle.store(on, Ordering::Relaxed);
    }

    pub fn set_clock_offset(&self, offset_ms: i64) {
        self.clock_offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// The server clock.
    pub fn now(&self) -> SystemTime {
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        let now = self.origin.wall + crate::clock::now().saturating_duration_since(self.origin.at);
        if offset >= 0 {
            now + Duration::from_millis(offset as u64)
        } else {
            now - Duration::from_millis(offset.unsigned_abs())
        }
    }

    /// The objects, locked (a lock poisoned by a panic elsewhere is taken over: the map is
    /// consistent between statements).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The objects, locked, with one operation counted.
    fn operation(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        inner.operations += 1;
        inner
    }

    /// How many reads and writes the store served (refused ones included).
    pub fn operations(&self) -> u64 {
        self.lock().operations
    }

    pub fn get(&self, name: &str) -> Result<Arc<StoredObject>, StoreError> {
        let inner = self.operation();
        inner.objects.get(name).cloned().ok_or(StoreError::NotFound)
    }

    /// Reads an object under preconditions, as GCS does for GET: a failed `if*Match` is 412,
    /// a failed `if*NotMatch` is 304. (Only the fake server reads under preconditions.)
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn get_checked(
        &self,
        name: &str,
        pre: Preconditions,
    ) -> Result<Arc<StoredObject>, StoreError> {
        let object = self.get(name)?;
        let matches = Preconditions {
            if_generation_not_match: None,
            if_metageneration_not_match: None,
            ..pre
        };
        check(Some(&object), matches, false)?;
        let not_matches = Preconditions {
            if_generation_match: None,
            if_metageneration_match: None,
            ..pre
        };
        check(Some(&object), not_matches, false).map_err(|_| StoreError::NotModified)?;
        Ok(object)
    }

    /// The objects whose names start with `prefix`, sorted by name.
    pub fn list(&self, prefix: &str) -> Vec<Arc<StoredObject>> {
        let inner = self.lock();
        let from = inner.objects.range(prefix.to_owned()..);
        from.take_while(|(name, _)| name.starts_with(prefix))
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().objects.len()
    }

    /// Creates or overwrites an object (a new generation, metageneration 1).
    pub fn insert(
        &self,
        name: &str,
        metadata: Metadata,
        cache_control: Option<Cow<'static, str>>,
        content_type: Option<Cow<'static, str>>,
        data: Cow<'static, [u8]>,
        pre: Preconditions,
    ) -> Result<Arc<StoredObject>, StoreError> {
        let now = self.now();
        let mut inner = self.operation();
        check(inner.object(name), pre, true)?;
        self.throttle_check(&mut inner, name)?;
        let object = Arc::new(StoredObject {
            name: name.to_owned(),
            generation: next_generation(&mut inner, now),
            metageneration: 1,
            created: now,
            updated: now,
            metadata,
            cache_control,
            content_type,
            data,
        });
        inner.objects.insert(name.to_owned(), object.clone());
        Ok(object)
    }

    /// Merges a metadata change into an object; bumps metageneration and `updated`.
    pub fn patch(
        &self,
        name: &str,
        patch: MetadataPatch,
        pre: Preconditions,
    ) -> Result<Arc<StoredObject>, StoreError> {
        let now = self.now();
        let mut inner = self.operation();
        check(inner.object(name), pre, false)?;
        self.throttle_check(&mut inner, name)?;
        let entry = inner.objects.get_mut(name).ok_or(StoreError::NotFound)?;
        // Copied only if a reply still shares it.
        let object = Arc::make_mut(entry);
        for (key, value) in patch {
            match value {
                Some(value) => object.metadata.insert(key, value),
                None => object.metadata.remove(&key),
            };
        }
        object.metageneration += 1;
        object.updated = now.max(object.updated);
        Ok(entry.clone())
    }

    pub fn delete(&self, name: &str, pre: Preconditions) -> Result<(), StoreError> {
        let mut inner = self.operation();
        check(inner.object(name), pre, false)?;
        self.throttle_check(&mut inner, name)?;
        inner.objects.remove(name);
        Ok(())
    }

    fn throttle_check(&self, inner: &mut Inner, name: &str) -> Result<(), StoreError> {
        if !self.throttle.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = crate::clock::now();
        if let Some(last) = inner.last_mutation.get(name) {
            if now.duration_since(*last) < MUTATION_SPACING {
                return Err(StoreError::RateLimited);
            }
        }
        if inner.last_mutation.len() > 4096 {
            inner
                .last_mutation
                .retain(|_, t| now.duration_since(*t) < MUTATION_SPACING);
        }
        inner.last_mutation.insert(name.to_owned(), now);
        Ok(())
    }
}

/// Generations are unique per name and, as on GCS, microsecond-clock-like and increasing.
fn next_generation(inner: &mut Inner, now: SystemTime) -> i64 {
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let generation = micros.max(inner.last_generation + 1);
    inner.last_generation = generation;
    generation
}

/// Evaluates preconditions as GCS does. A missing object is 404 for writes that need one
/// (`insert == false`: patch, delete), and fails any precondition but `ifGenerationMatch=0`
/// (or a not-match) for inserts.
fn check(
    current: Option<&StoredObject>,
    pre: Preconditions,
    insert: bool,
) -> Result<(), StoreError> {
    let Some(object) = current else {
        if !insert {
            return Err(StoreError::NotFound);
        }
        return match (pre.if_generation_match, pre.if_metageneration_match) {
            (Some(g), _) if g != 0 => Err(StoreError::PreconditionFailed),
            (_, Some(_)) => Err(StoreError::PreconditionFailed),
            _ => Ok(()),
        };
    };
    let ok = pre
        .if_generation_match
        .is_none_or(|g| g == object.generation)
        && pre
            .if_generation_not_match
            .is_none_or(|g| g != object.generation)
        && pre
            .if_metageneration_match
            .is_none_or(|m| m == object.metageneration)
        && pre
            .if_metageneration_not_match
            .is_none_or(|m| m != object.metageneration);
    if ok {
        Ok(())
    } else {
        Err(StoreError::PreconditionFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_match(g: i64) -> Preconditions {
        Preconditions {
            if_generation_match: Some(g),
            ..Default::default()
        }
    }

    fn insert(
        store: &Store,
        name: &str,
        pre: Preconditions,
    ) -> Result<Arc<StoredObject>, StoreError> {
        store.insert(name, Metadata::new(), None, None, Cow::Borrowed(b"x"), pre)
    }

    #[test]
    fn create_if_absent_then_conflict() {
        let store = Store::default();
        let a = insert(&store, "k", gen_match(0)).unwrap();
        assert_eq!(a.metageneration, 1);
        assert_eq!(
            insert(&store, "k", gen_match(0)),
            Err(StoreError::PreconditionFailed)
        );
    }

    #[test]
    fn overwrite_gives_new_generation_and_resets_metageneration() {
        let store = Store::default();
        let a = insert(&store, "k", gen_match(0)).unwrap();
        let p = store
            .patch(
                "k",
                vec![("a".into(), Some("1".into()))],
                gen_match(a.generation),
            )
            .unwrap();
        assert_eq!(p.metageneration, 2);
        let b = insert(
            &store,
            "k",
            Preconditions {
                if_generation_match: Some(a.generation),
                if_metageneration_match: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(a.generation, b.generation);
        assert_eq!(b.metageneration, 1);
        assert!(b.metadata.is_empty());
    }

    #[test]
    fn stale_metageneration_is_refused() {
        let store = Store::default();
        let a = insert(&store, "k", gen_match(0)).unwrap();
        store.patch("k", vec![], Preconditions::default()).unwrap();
        let stale = Preconditions {
            if_generation_match: Some(a.generation),
            if_metageneration_match: Some(1),
            ..Default::default()
        };
        assert_eq!(
            store.delete("k", stale),
            Err(StoreError::PreconditionFailed)
        );
        assert_eq!(
            store.patch("k", vec![], stale),
            Err(StoreError::PreconditionFailed)
        );
    }

    #[test]
    fn missing_object_is_not_found_for_patch_and_delete() {
        let store = Store::default();
        assert_eq!(store.delete("k", gen_match(3)), Err(StoreError::NotFound));
        assert_eq!(
            store.patch("k", vec![], gen_match(3)),
            Err(StoreError::NotFound)
        );
        assert_eq!(
            insert(&store, "k", gen_match(3)),
            Err(StoreError::PreconditionFailed)
        );
    }

    #[test]
    fn reads_honour_preconditions() {
        let store = Store::default();
        let a = insert(&store, "k", gen_match(0)).unwrap();
        assert!(store.get_checked("k", gen_match(a.generation)).is_ok());
        assert_eq!(
            store.get_checked("k", gen_match(a.generation + 1)),
            Err(StoreError::PreconditionFailed)
        );
        let not = Preconditions {
            if_generation_not_match: Some(a.generation),
            ..Default::default()
        };
        assert_eq!(store.get_checked("k", not), Err(StoreError::NotModified));
        assert_eq!(
            store.get_checked("absent", gen_match(1)),
            Err(StoreError::NotFound)
        );
    }

    #[test]
    fn throttle_limits_mutations_per_name() {
        let store = Store::default();
        store.set_throttle(true);
        let a = insert(&store, "k", gen_match(0)).unwrap();
        assert_eq!(
            store.delete("k", gen_match(a.generation)),
            Err(StoreError::RateLimited)
        );
        assert!(insert(&store, "other", gen_match(0)).is_ok());
        assert_eq!(store.get("k").unwrap().generation, a.generation);
    }

    #[test]
    fn patch_merges_and_removes_keys() {
        let store = Store::default();
        let md = Metadata::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        store
            .insert("k", md, None, None, Cow::Borrowed(&[]), gen_match(0))
            .unwrap();
        let p = store
            .patch(
                "k",
                vec![("a".into(), None), ("c".into(), Some("3".into()))],
                Preconditions::default(),
            )
            .unwrap();
        let md: Vec<_> = p.metadata.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(md, [("b", "2"), ("c", "3")]);
    }

    #[test]
    fn lists_are_sorted_and_filtered_by_prefix() {
        let store = Store::default();
        let names: Vec<String> = (0..100).map(|i| format!("n{i:03}")).collect();
        for name in names.iter().rev() {
            insert(&store, name, gen_match(0)).unwrap();
        }
        assert_eq!(store.len(), 100);
        let listed: Vec<String> = store
            .list("n0")
            .iter()
            .map(|o| o.name.to_string())
            .collect();
        assert_eq!(listed, names[..100].to_vec(), "sorted");
        assert_eq!(store.list("n1").len(), 0);
        assert_eq!(store.list("n05").len(), 10);
    }

    #[test]
    fn every_operation_counts_refused_ones_too() {
        let store = Store::default();
        let a = insert(&store, "k", gen_match(0)).unwrap();
        assert!(insert(&store, "k", gen_match(0)).is_err());
        assert_eq!(store.get("missing"), Err(StoreError::NotFound));
        store.delete("k", gen_match(a.generation)).unwrap();
        assert_eq!(store.len(), 0, "len is no operation");
        assert_eq!(store.operations(), 4);
    }

    #[test]
    fn a_name_created_again_gets_a_later_generation() {
        let store = Store::default();
        let mut last = 0;
        for _ in 0..1000 {
            let a = insert(&store, "k", gen_match(0)).unwrap();
            assert!(a.generation > last);
            last = a.generation;
            store.delete("k", gen_match(a.generation)).unwrap();
        }
    }
}
