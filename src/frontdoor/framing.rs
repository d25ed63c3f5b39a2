//! Request framing checks on the client-to-server byte stream.
//!
//! tiny_http reads header lines without any size limit, so the front door
//! finds where each request head ends before forwarding it: a head must end
//! within [`MAX_HEAD_BYTES`], carry at most one `Content-Length` (or several
//! equal ones), no `Transfer-Encoding` (the API takes only small JSON bodies
//! with a length), and announce a body no larger than [`MAX_BODY_BYTES`].
//! Bytes of a body are counted through so that the next head is checked too.

use crate::error::ApiError;

/// Longest request head (request line plus headers) we accept. A curl
/// request with a client certificate and a token is well under 1 KiB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Largest request body: a provision request is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Where the framer is in the stream.
enum State {
    /// Collecting a request head; holds the bytes seen so far.
    Head(Vec<u8>),
    /// Passing through a body with this many bytes still to come.
    Body(u64),
}

pub struct Framer {
    state: State,
    /// Requests passed on whole so far.
    completed: u64,
}

impl Default for Framer {
    fn default() -> Self {
        Framer { state: State::Head(Vec::new()), completed: 0 }
    }
}

impl Framer {
    /// Takes the next bytes from the client and appends to `out` what may be
    /// forwarded. An error means the connection must be answered with it and
    /// closed; nothing more from this client is forwarded.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ApiError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Body(remaining) => {
                    let n = (*remaining).min(input.len() as u64) as usize;
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::Head(Vec::new());
                        self.completed += 1;
                    }
                }
                State::Head(buf) => {
                    let searched_from = buf.len().saturating_sub(3);
                    let room = MAX_HEAD_BYTES + 1 - buf.len();
                    let take = input.len().min(room);
                    buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let Some(end) = find_head_end(buf, searched_from) else {
                        if buf.len() > MAX_HEAD_BYTES {
                            return Err(ApiError::header_too_large(MAX_HEAD_BYTES));
                        }
                        continue;
                    };
                    // Bytes read past the head's end belong to the body or
                    // the next request: put them back in front of `input`.
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let rest = std::mem::take(buf);
                    let body = body_length(&head)?;
                    out.extend_from_slice(&head);
                    self.state = if body == 0 {
                        self.completed += 1;
                        State::Head(Vec::new())
                    } else {
                        State::Body(body)
                    };
                    if !rest.is_empty() {
                        // Re-feed the leftovers, then the remaining input.
                        let mut combined = rest;
                        combined.extend_from_slice(input);
                        return self.feed(&combined, out);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Framer {
    /// Whether part of a request (head or body) has arrived and the rest
    /// has not: the bridge gives a request a deadline from its first byte,
    /// so that a client trickling one byte at a time cannot hold a
    /// connection open for ever.
    pub fn mid_request(&self) -> bool {
        match &self.state {
            State::Head(buf) => !buf.is_empty(),
            State::Body(_) => true,
        }
    }

    /// How many requests have been passed on whole.
    pub fn completed(&self) -> u64 {
        self.completed
    }
}

/// Index just past the first blank line (`\r\n\r\n`, or a bare `\n\n`).
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some(i + 4);
        }
        if buf[i..].starts_with(b"\n\n") {
            return Some(i + 2);
        }
        i += 1;
    }
    None
}

/// The body length a head announces, or why it cannot be forwarded.
fn body_length(head: &[u8]) -> Result<u64, ApiError> {
    let text = String::from_utf8_lossy(head);
    let mut length: Option<u64> = None;
    for line in text.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::length_required(
                "Transfer-Encoding is not accepted; send the body with a Content-Length",
            ));
        }
        if name.eq_ignore_ascii_case("content-length") {
            // Digits only (RFC 9110): Rust's parse would also take "+2",
            // which another parser in the path might read differently.
            let bad = || ApiError::invalid_request(format!("bad Content-Length {value:?}"));
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = value.parse().map_err(|_| bad())?;
            if length.is_some_and(|m| m != n) {
                return Err(ApiError::invalid_request("conflicting Content-Length headers"));
            }
            length = Some(n);
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY_BYTES as u64 {
        return Err(ApiError::body_too_large(MAX_BODY_BYTES));
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Result<Vec<u8>, ApiError> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn test_pipelined_requests_pass_through_whole() {
        let a = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(feed_all(&[a]).unwrap(), a.to_vec());
        // The same stream split at every byte gives the same output.
        let chunks: Vec<&[u8]> = a.chunks(1).collect();
        assert_eq!(feed_all(&chunks).unwrap(), a.to_vec());
        // Each request is counted once it has passed whole, body included.
        let mut framer = Framer::default();
        let mut out = Vec::new();
        framer.feed(&a[..40], &mut out).unwrap();
        assert_eq!((framer.completed(), framer.mid_request()), (0, true));
        framer.feed(&a[40..], &mut out).unwrap();
        assert_eq!((framer.completed(), framer.mid_request()), (2, false));
    }

    #[test]
    fn test_incomplete_head_is_held_back() {
        assert_eq!(feed_all(&[b"GET / HTTP/1.1\r\nHost: x\r\n"]).unwrap(), b"");
    }

    #[test]
    fn test_oversized_head_is_431() {
        let big = vec![b'a'; MAX_HEAD_BYTES + 10];
        assert_eq!(feed_all(&[b"GET / HTTP/1.1\r\nX: ", &big]).unwrap_err().status, 431);
        // A head in the second request on a connection is checked too.
        let first = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(feed_all(&[first, b"GET / HTTP/1.1\r\nX: ", &big]).unwrap_err().status, 431);
    }

    #[test]
    fn test_body_rules() {
        let te = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(feed_all(&[te]).unwrap_err().status, 411);
        let both = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(feed_all(&[both]).unwrap_err().details, "conflicting Content-Length headers");
        let same = b"POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx";
        assert!(feed_all(&[same]).is_ok());
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert_eq!(feed_all(&[big.as_bytes()]).unwrap_err().code, "body_too_large");
        let junk = b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(feed_all(&[junk]).unwrap_err().status, 400);
        let signed = b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx";
        assert_eq!(feed_all(&[signed]).unwrap_err().details, "bad Content-Length \"+1\"");
    }
}
