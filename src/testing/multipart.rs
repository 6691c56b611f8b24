//! A small `multipart/related` parser for GCS multipart uploads (RFC 2046 §5.1.1).
//!
//! Lenient where real clients differ (LF or CRLF line endings, quoted boundaries, transport
//! padding after a delimiter, a preamble and an epilogue), strict where GCS is (the closing
//! delimiter must be present).

/// One body part: its headers and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part<'a> {
    headers: Vec<(String, String)>,
    body: &'a [u8],
}

impl<'a> Part<'a> {
    /// A header value by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn body(&self) -> &'a [u8] {
        self.body
    }
}

/// The `boundary` parameter of a `multipart/related` content type, unquoted.
pub(crate) fn boundary(content_type: &str) -> Result<String, String> {
    let mut params = content_type.split(';');
    let essence = params.next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("multipart/related") {
        return Err(format!(
            "multipart uploads need Content-Type multipart/related, got {essence:?}"
        ));
    }
    for param in params {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        if !key.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let value = unquote(value.trim());
        if value.is_empty() || value.len() > 200 {
            return Err("invalid multipart boundary".into());
        }
        return Ok(value);
    }
    Err("multipart Content-Type without a boundary".into())
}

fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Splits a multipart body into its parts.
pub(crate) fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, String> {
    let delimiter = format!("--{boundary}").into_bytes();
    let mut parts = Vec::new();
    // Start of the current part's content, once the first delimiter has been seen.
    let mut open: Option<usize> = None;
    let mut from = 0;
    while let Some(found) = find(&body[from..], &delimiter) {
        let at = from + found;
        from = at + delimiter.len();
        if at > 0 && body[at - 1] != b'\n' {
            continue;
        }
        let rest = &body[from..];
        if rest.starts_with(b"--") {
            if let Some(start) = open {
                parts.push(part(body, start, at)?);
                return Ok(parts);
            }
            return Err("multipart body has no parts".into());
        }
        let padding = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        let line_break = match &rest[padding..] {
            [b'\r', b'\n', ..] => 2,
            [b'\n', ..] => 1,
            _ => continue,
        };
        if let Some(start) = open {
            parts.push(part(body, start, at)?);
        }
        from += padding + line_break;
        open = Some(from);
    }
    if open.is_some() {
        Err("multipart body without a closing boundary".into())
    } else {
        Err("multipart body without the boundary of its Content-Type".into())
    }
}

/// The part whose content starts at `start` and whose next delimiter starts at `delimiter`.
fn part(body: &[u8], start: usize, delimiter: usize) -> Result<Part<'_>, String> {
    // The line break before a delimiter belongs to the delimiter.
    let mut end = delimiter.max(start);
    if end > start && body[end - 1] == b'\n' {
        end -= 1;
        if end > start && body[end - 1] == b'\r' {
            end -= 1;
        }
    }
    let raw = &body[start..end];
    let (head, content) = split_head(raw);
    let head = std::str::from_utf8(head).map_err(|_| "multipart part headers are not UTF-8")?;
    let mut headers = Vec::new();
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed multipart part header {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(Part {
        headers,
        body: content,
    })
}

/// Splits a part at the empty line ending its headers.
fn split_head(raw: &[u8]) -> (&[u8], &[u8]) {
    if let Some(rest) = raw.strip_prefix(b"\r\n") {
        return (&[], rest);
    }
    if let Some(rest) = raw.strip_prefix(b"\n") {
        return (&[], rest);
    }
    let crlf = find(raw, b"\r\n\r\n").map(|i| (i, 4));
    let lf = find(raw, b"\n\n").map(|i| (i, 2));
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    match end {
        Some((i, len)) => (&raw[..i], &raw[i + len..]),
        // Headers only, no content.
        None => (raw, &[]),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_plain_and_quoted() {
        assert_eq!(boundary("multipart/related; boundary=abc").unwrap(), "abc");
        assert_eq!(
            boundary("Multipart/Related; charset=x; Boundary=\"a b\\\"c\"").unwrap(),
            "a b\"c"
        );
        assert!(boundary("multipart/form-data; boundary=abc").is_err());
        assert!(boundary("multipart/related").is_err());
        assert!(boundary("multipart/related; boundary=\"\"").is_err());
    }

    #[test]
    fn crlf_body_with_preamble_and_epilogue() {
        let body = b"preamble\r\n--XX\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{\"name\":\"a\"}\r\n--XX\r\nContent-Type: plain/text\r\n\r\nlock\r\n\r\n--XX--\r\nepilogue";
        let parts = parse(body, "XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            parts[0].header("content-type"),
            Some("application/json; charset=UTF-8")
        );
        assert_eq!(parts[0].body(), b"{\"name\":\"a\"}");
        assert_eq!(parts[1].header("Content-Type"), Some("plain/text"));
        assert_eq!(parts[1].body(), b"lock\r\n");
    }

    #[test]
    fn lf_body_without_headers_and_with_padding() {
        let body = b"--b  \n\n{}\n--b\nX-A: 1\n\n\n--b--";
        let parts = parse(body, "b").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].body(), b"{}");
        assert_eq!(parts[1].header("x-a"), Some("1"));
        assert_eq!(parts[1].body(), b"");
    }

    #[test]
    fn boundary_lookalikes_inside_content_are_content() {
        let body = b"--b\r\n\r\nx--b\r\n--bc\r\n\r\n--b--";
        let parts = parse(body, "b").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].body(), b"x--b\r\n--bc\r\n");
    }

    #[test]
    fn missing_boundaries_are_errors() {
        assert!(parse(b"--b\r\n\r\nx\r\n", "b").is_err());
        assert!(parse(b"nothing here", "b").is_err());
        assert!(parse(b"--b--", "b").is_err());
        assert!(parse(b"--b\r\nbad header\r\n\r\nx\r\n--b--", "b").is_err());
    }
}
