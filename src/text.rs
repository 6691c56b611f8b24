//! [`Text`]: a string held inline when it is short, otherwise shared; for the strings that
//! every lock makes (its key, its metadata values, the in-memory store's object names), which
//! would otherwise cost an allocation each.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// A string of at most `N` bytes (`N` < 256) held inline, or a longer one shared.
///
/// Compared, ordered and hashed as bytes (the order of `str`), and a map keyed by it is looked
/// up by `&[u8]`: reading an inline one as `str` validates it again, which its hot uses do not
/// pay.
#[derive(Clone)]
pub(crate) enum Text<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Shared(Arc<str>),
}

impl<const N: usize> Text<N> {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Text::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Text::Shared(s) => s.as_bytes(),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Only ever written from a `&str` of `len` bytes.
            Text::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Text::Shared(s) => s,
        }
    }

    /// `a` followed by `b`, both UTF-8 (the bytes of a `str` or a `Text`): inline if it fits
    /// (no allocation), else one allocation.
    pub(crate) fn concat(a: &[u8], b: &[u8]) -> Self {
        const { assert!(N < 256) };
        debug_assert!(std::str::from_utf8(a).is_ok() && std::str::from_utf8(b).is_ok());
        let len = a.len() + b.len();
        if len <= N {
            let mut bytes = [0; N];
            bytes[..a.len()].copy_from_slice(a);
            bytes[a.len()..len].copy_from_slice(b);
            Text::Inline {
                len: len as u8,
                bytes,
            }
        } else {
            let mut s = Vec::with_capacity(len);
            s.extend_from_slice(a);
            s.extend_from_slice(b);
            Text::Shared(String::from_utf8(s).unwrap_or_default().into())
        }
    }

    pub(crate) fn into_shared(self) -> Arc<str> {
        match self {
            Text::Shared(s) => s,
            inline => inline.as_str().into(),
        }
    }
}

impl<const N: usize> From<&str> for Text<N> {
    /// Inline if it fits, else one allocation.
    fn from(s: &str) -> Self {
        const { assert!(N < 256) };
        if s.len() <= N {
            let mut bytes = [0; N];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Text::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Text::Shared(s.into())
        }
    }
}

impl<const N: usize> From<String> for Text<N> {
    fn from(s: String) -> Self {
        if s.len() <= N {
            Text::from(s.as_str())
        } else {
            Text::Shared(s.into())
        }
    }
}

impl<const N: usize> From<Arc<str>> for Text<N> {
    /// Shared as it is.
    fn from(s: Arc<str>) -> Self {
        Text::Shared(s)
    }
}

impl<const N: usize> Deref for Text<N> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> Borrow<[u8]> for Text<N> {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> PartialEq for Text<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<const N: usize> Eq for Text<N> {}

impl<const N: usize> PartialOrd for Text<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Ord for Text<N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

/// As `[u8]` hashes: a map keyed by `Text` is looked up by `&[u8]`.
impl<const N: usize> Hash for Text<N> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> fmt::Display for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn short_text_is_inline_long_text_shared_and_both_compare_and_hash_as_str() {
        let four: Text<4> = "abcd".into();
        assert!(matches!(four, Text::Inline { len: 4, .. }));
        assert!(matches!(Text::<4>::from("é"), Text::Inline { len: 2, .. }));
        assert!(matches!(
            Text::<4>::from(String::from("abcde")),
            Text::Shared(_)
        ));
        let shared = Text::<4>::from(Arc::<str>::from("abcd"));
        assert!(matches!(shared, Text::Shared(_)));
        assert_eq!(four, shared);
        assert_eq!(&*four.clone().into_shared(), "abcd");
        assert_eq!(Text::<4>::concat(b"ab", b"cd"), four);
        assert!(matches!(
            Text::<4>::concat(b"ab", b"cd"),
            Text::Inline { len: 4, .. }
        ));
        let long = Text::<4>::concat(b"ab", b"cde");
        assert!(matches!(&long, Text::Shared(s) if &**s == "abcde"));
        assert_eq!(
            Text::<4>::concat("é".as_bytes(), "ü".as_bytes()).as_str(),
            "éü"
        );
        assert!(Text::<4>::from("abc") < four);
        assert!(Text::<4>::from("b") > Text::<4>::from("abcde"));
        assert_eq!(format!("{four} {four:?}"), r#"abcd "abcd""#);

        let map: HashMap<Text<4>, u8> = [(four, 1), (Text::from("longer"), 2)].into();
        let get = |k: &str| map.get(k.as_bytes());
        assert_eq!(
            (get("abcd"), get("longer"), get("abc")),
            (Some(&1), Some(&2), None)
        );
    }
}
