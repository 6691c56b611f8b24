//! What makes two requests "the same": the record's name (route, scope, key) and the
//! request's fingerprint (method, path, query, body, chosen headers).

use http::HeaderName;
use http::request::Parts;
use sha2::{Digest, Sha256};

use crate::key::LockKey;

/// The lock key of the record for `key`, scoped by method, route and `scope`: a hash, so
/// that keys of any length and content map to one object name each, and the raw key is in
/// no object name.
pub(crate) fn record_key(parts: &Parts, scope: Option<&LockKey>, key: &LockKey) -> LockKey {
    let mut h = Sha256::new();
    field(&mut h, parts.method.as_str().as_bytes());
    field(&mut h, route(parts).as_bytes());
    field(&mut h, scope.map_or("", LockKey::as_str).as_bytes());
    field(&mut h, key.as_str().as_bytes());
    let name = format!("idempotency/{}", hex(&h.finalize()));
    LockKey::new(name).expect("a hex name is a valid key")
}

/// The matched route under axum (`/jobs/{id}/run`), else the path.
fn route(parts: &Parts) -> &str {
    #[cfg(feature = "axum")]
    if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
        return matched.as_str();
    }
    parts.uri.path()
}

/// The fingerprint of a request: method, path and query, the `headers` chosen, and the body.
pub(crate) fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> String {
    let mut h = Sha256::new();
    field(&mut h, parts.method.as_str().as_bytes());
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    field(&mut h, target.as_bytes());
    for name in headers {
        let values = parts.headers.get_all(name);
        field(&mut h, name.as_str().as_bytes());
        h.update((values.iter().count() as u64).to_be_bytes());
        for value in values {
            field(&mut h, value.as_bytes());
        }
    }
    field(&mut h, &Sha256::digest(body));
    hex(&h.finalize())
}

/// One field, length first: no two different lists of fields hash alike.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digit = |n: u8| char::from(DIGITS[usize::from(n)]);
    bytes
        .iter()
        .flat_map(|b| [digit(b >> 4), digit(b & 0xf)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, header: Option<&str>) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        if let Some(v) = header {
            b = b.header("x-tenant", v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn records_are_scoped_by_method_route_and_scope() {
        let key = LockKey::new("k-1").unwrap();
        let a = record_key(&parts("POST", "/jobs/a", None), None, &key);
        assert_eq!(
            a,
            record_key(&parts("POST", "/jobs/a?x=1", None), None, &key)
        );
        assert_ne!(a, record_key(&parts("PUT", "/jobs/a", None), None, &key));
        assert_ne!(a, record_key(&parts("POST", "/jobs/b", None), None, &key));
        let t1 = LockKey::new("t1").unwrap();
        assert_ne!(
            a,
            record_key(&parts("POST", "/jobs/a", None), Some(&t1), &key)
        );
        assert!(a.as_str().starts_with("idempotency/") && !a.as_str().contains("k-1"));
        // Length-prefixed fields: moving a character between scope and key changes the name.
        let (s1, k1) = (LockKey::new("ab").unwrap(), LockKey::new("c").unwrap());
        let (s2, k2) = (LockKey::new("a").unwrap(), LockKey::new("bc").unwrap());
        let p = parts("POST", "/", None);
        assert_ne!(
            record_key(&p, Some(&s1), &k1),
            record_key(&p, Some(&s2), &k2)
        );
    }

    #[test]
    fn the_fingerprint_covers_method_target_body_and_chosen_headers() {
        let tenant = [HeaderName::from_static("x-tenant")];
        let base = fingerprint(&parts("POST", "/a?x=1", Some("t1")), &tenant, b"{}");
        assert_eq!(
            base,
            fingerprint(&parts("POST", "/a?x=1", Some("t1")), &tenant, b"{}")
        );
        assert_ne!(
            base,
            fingerprint(&parts("POST", "/a?x=2", Some("t1")), &tenant, b"{}")
        );
        assert_ne!(
            base,
            fingerprint(&parts("PUT", "/a?x=1", Some("t1")), &tenant, b"{}")
        );
        assert_ne!(
            base,
            fingerprint(&parts("POST", "/a?x=1", Some("t2")), &tenant, b"{}")
        );
        assert_ne!(
            base,
            fingerprint(&parts("POST", "/a?x=1", Some("t1")), &tenant, b"{ }")
        );
        // A header not chosen does not count.
        assert_eq!(
            fingerprint(&parts("POST", "/a", Some("t1")), &[], b""),
            fingerprint(&parts("POST", "/a", Some("t2")), &[], b"")
        );
        assert_eq!(base.len(), 64);
        assert_eq!(hex(&[0x00, 0x9f, 0xa0, 0xff]), "009fa0ff");
    }
}
