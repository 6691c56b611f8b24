//! [`Metadata`]: the custom metadata of a lock object, cheap to build and to share.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::text::Text;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

type Entry = (Cow<'static, str>, Value);

/// A metadata value. The longest held inline is 30 bytes: an `expires`, written at every
/// acquisition and refresh, and a `ttl` cost no allocation of their own; an owner id is
/// shared by the lease and every object state that carries it.
pub(crate) type Value = Text<30>;

/// Custom metadata of a lock object (`metadata` in the GCS object resource): string keys to
/// string values, kept sorted by key.
///
/// Every lock acquisition builds one and every reply carries one, so it is made to be cheap:
/// the entries live in one shared allocation (a clone shares them, it does not copy), keys
/// known at compile time are not copied at all, values are shared strings (`Arc<str>`), so a
/// value used in many objects is one allocation, and short values read from JSON or written by
/// this crate (an `expires`, a `ttl`) live within the entries. Changing an entry copies the
/// entries once.
///
/// ```
/// use dimutex::backend::Metadata;
/// let mut md = Metadata::from([("owner", "me"), ("ttl", "30")]);
/// assert_eq!(md.get("ttl"), Some("30"));
/// md.insert("ttl", "60");
/// md.remove("owner");
/// assert_eq!(md.iter().collect::<Vec<_>>(), [("ttl", "60")]);
/// assert_eq!(serde_json::to_string(&md).unwrap(), r#"{"ttl":"60"}"#);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata {
    /// Sorted by key, keys unique; `None` when empty (no allocation).
    entries: Option<Arc<[Entry]>>,
}

impl Metadata {
    /// Empty metadata; does not allocate.
    ///
    /// ```
    /// assert!(dimutex::backend::Metadata::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> &[Entry] {
        self.entries.as_deref().unwrap_or_default()
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.entries().binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// The value of `key`, if set.
    ///
    /// ```
    /// let md = dimutex::backend::Metadata::from([("owner", "me")]);
    /// assert_eq!(md.get("owner"), Some("me"));
    /// assert_eq!(md.get("ttl"), None);
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self.find(key).ok()?;
        Some(self.entries()[i].1.as_str())
    }

    /// Whether `key` is set.
    ///
    /// ```
    /// assert!(dimutex::backend::Metadata::from([("a", "1")]).contains_key("a"));
    /// ```
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    ///
    /// ```
    /// let mut md = dimutex::backend::Metadata::new();
    /// assert_eq!(md.insert("a", "1"), None);
    /// assert_eq!(md.insert("a", "2").as_deref(), Some("1"));
    /// ```
    pub fn insert(
        &mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<Arc<str>>,
    ) -> Option<Arc<str>> {
        let key = key.into();
        let value = Value::from(value.into());
        let mut entries = self.entries().to_vec();
        let old = match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut entries[i].1, value).into_shared()),
            Err(i) => {
                entries.insert(i, (key, value));
                None
            }
        };
        self.entries = Some(entries.into());
        old
    }

    /// Removes `key`; returns its value.
    ///
    /// ```
    /// let mut md = dimutex::backend::Metadata::from([("a", "1")]);
    /// assert_eq!(md.remove("a").as_deref(), Some("1"));
    /// assert!(md.is_empty());
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<Arc<str>> {
        let i = self.find(key).ok()?;
        let mut entries = self.entries().to_vec();
        let (_, old) = entries.remove(i);
        self.entries = (!entries.is_empty()).then(|| entries.into());
        Some(old.into_shared())
    }

    /// The entries, sorted by key.
    ///
    /// ```
    /// let md = dimutex::backend::Metadata::from([("b", "2"), ("a", "1")]);
    /// assert_eq!(md.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
    /// ```
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.entries().iter().map(|(k, v)| (&**k, v.as_str()))
    }

    /// The entries as changes that set them (what a PATCH of this metadata does).
    pub(crate) fn changes(&self) -> impl Iterator<Item = (Cow<'static, str>, Option<Value>)> + '_ {
        self.entries()
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// This metadata with `changes` applied in order (`None` removes the key), copied once.
    pub(crate) fn merged<K: Into<Cow<'static, str>>, V: Into<Value>>(
        &self,
        changes: impl IntoIterator<Item = (K, Option<V>)>,
    ) -> Self {
        let mut entries = self.entries().to_vec();
        for (key, value) in changes {
            let key = key.into();
            let value = value.map(Into::into);
            match (entries.binary_search_by(|(k, _)| k.cmp(&key)), value) {
                (Ok(i), Some(value)) => entries[i].1 = value,
                (Ok(i), None) => {
                    entries.remove(i);
                }
                (Err(i), Some(value)) => entries.insert(i, (key, value)),
                (Err(_), None) => {}
            }
        }
        Self {
            entries: (!entries.is_empty()).then(|| entries.into()),
        }
    }

    /// Metadata from entries in any order; of equal keys the last wins.
    fn from_vec(mut entries: Vec<Entry>) -> Self {
        // Stable: equal keys keep their order, so the last one given is the last of its run.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut unique: Vec<Entry> = Vec::with_capacity(entries.len());
        for entry in entries {
            match unique.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => unique.push(entry),
            }
        }
        Self {
            entries: (!unique.is_empty()).then(|| unique.into()),
        }
    }
}

impl<K, V, const N: usize> From<[(K, V); N]> for Metadata
where
    K: Into<Cow<'static, str>>,
    V: Into<Arc<str>>,
{
    /// Metadata from key-value pairs; one allocation when the keys are distinct.
    fn from(pairs: [(K, V); N]) -> Self {
        let mut entries = pairs.map(|(k, v)| (k.into(), Value::from(v.into())));
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if N == 0 {
            Self::default()
        } else if entries.windows(2).all(|w| w[0].0 != w[1].0) {
            Self {
                entries: Some(Arc::from(entries)),
            }
        } else {
            Self::from_vec(entries.into())
        }
    }
}

impl<K, V> FromIterator<(K, V)> for Metadata
where
    K: Into<Cow<'static, str>>,
    V: Into<Arc<str>>,
{
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_vec(
            iter.into_iter()
                .map(|(k, v)| (k.into(), Value::from(v.into())))
                .collect(),
        )
    }
}

impl std::ops::Index<&str> for Metadata {
    type Output = str;

    /// The value of `key`, as maps index.
    ///
    /// # Panics
    ///
    /// If `key` is not set; [`Metadata::get`] does not panic.
    ///
    /// ```
    /// let md = dimutex::backend::Metadata::from([("ttl", "30")]);
    /// assert_eq!(&md["ttl"], "30");
    /// ```
    fn index(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("no metadata key {key:?}"))
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = Metadata;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some((k, ValueStr(v))) = map.next_entry::<String, ValueStr>()? {
                    entries.push((Cow::Owned(k), v));
                }
                Ok(Metadata::from_vec(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor)
    }
}

/// A JSON string read straight into a [`Value`] (inline, or one allocation; no intermediate
/// `String`).
struct ValueStr(Value);

impl<'de> Deserialize<'de> for ValueStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl Visitor<'_> for StrVisitor {
            type Value = ValueStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ValueStr, E> {
                Ok(ValueStr(v.into()))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_keep_the_last_value() {
        let md = Metadata::from([("a", "1"), ("b", "2"), ("a", "3")]);
        assert_eq!(md.iter().collect::<Vec<_>>(), [("a", "3"), ("b", "2")]);
        let md: Metadata = [("a", "1"), ("a", "2")].into_iter().collect();
        assert_eq!(md.get("a"), Some("2"));
    }

    #[test]
    fn a_clone_shares_until_changed() {
        let mut a = Metadata::from([("k", "v")]);
        let b = a.clone();
        assert!(Arc::ptr_eq(
            a.entries.as_ref().unwrap(),
            b.entries.as_ref().unwrap()
        ));
        a.insert("k", "w");
        assert_eq!((a.get("k"), b.get("k")), (Some("w"), Some("v")));
        assert_ne!(a, b);
    }

    #[test]
    fn json_round_trip_and_order_independence() {
        let md: Metadata = serde_json::from_str(r#"{"z":"1","a":"2","z":"3"}"#).unwrap();
        assert_eq!(md.iter().collect::<Vec<_>>(), [("a", "2"), ("z", "3")]);
        assert_eq!(serde_json::to_string(&md).unwrap(), r#"{"a":"2","z":"3"}"#);
        assert_eq!(md, Metadata::from([("z", "3"), ("a", "2")]));
        assert!(serde_json::from_str::<Metadata>(r#"{"a":1}"#).is_err());
        let empty: Metadata = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Metadata::new());
        assert!(empty.entries.is_none());
    }

    #[test]
    fn merged_applies_changes_in_order() {
        let md = Metadata::from([("a", "1"), ("b", "2")]);
        let changed = md.merged([
            ("c", Some("3")),
            ("a", None),
            ("b", Some("4")),
            ("zz", None),
        ]);
        assert_eq!(changed.iter().collect::<Vec<_>>(), [("b", "4"), ("c", "3")]);
        assert_eq!(md.get("a"), Some("1"));
        assert_eq!(
            md.merged([("a", None::<&str>), ("b", None)]),
            Metadata::new()
        );
    }

    #[test]
    fn short_values_live_inline_and_equal_shared_ones() {
        use std::hash::BuildHasher;
        let expires = "2026-26-11 06:22:41.123456 UTC";
        let long = "x".repeat(30 + 1);
        assert_eq!(expires.len(), 30);
        assert!(matches!(Value::from(expires), Value::Inline { .. }));
        assert!(matches!(
            Value::from(String::from("ünïcödé")),
            Value::Inline { .. }
        ));
        assert!(matches!(Value::from(&*long), Value::Shared(_)));
        assert!(matches!(Value::from(long.clone()), Value::Shared(_)));

        let json = format!(r#"{{"expires":"{expires}","owner":"{long}"}}"#);
        let parsed: Metadata = serde_json::from_str(&json).unwrap();
        assert!(matches!(parsed.entries()[0].1, Value::Inline { .. }));
        let built = Metadata::from([("owner", &*long), ("expires", expires)]);
        assert!(matches!(built.entries()[0].1, Value::Shared(_)));
        assert_eq!(parsed, built);
        let hasher = std::collections::hash_map::RandomState::new();
        assert_eq!(hasher.hash_one(&parsed), hasher.hash_one(&built));
        assert_eq!(parsed.get("expires"), Some(expires));
        assert_eq!(serde_json::to_string(&parsed).unwrap(), json);

        let mut md = parsed;
        assert_eq!(md.insert("expires", "later").as_deref(), Some(expires));
        assert_eq!(md.remove("expires").as_deref(), Some("later"));
    }

    #[test]
    fn removing_the_last_entry_leaves_it_empty() {
        let mut md = Metadata::from([("a", "1")]);
        assert_eq!(md.remove("missing"), None);
        md.remove("a");
        assert_eq!(md, Metadata::new());
    }
}
