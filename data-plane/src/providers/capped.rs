//! Reading upstream bodies under a size cap (DESIGN §19): a declared `Content-Length` over the cap
//! is refused before a byte is read, an undeclared one is read up to the cap and then refused, so
//! no upstream can make the gateway buffer more than the cap.

use bytes::{Bytes, BytesMut};

/// Most bytes of an upstream error answer (non-2xx) kept for its message.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Why an upstream body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum CappedReadError {
    #[error("the answer declares {declared} bytes, over the limit of {cap} bytes")]
    DeclaredTooLarge { declared: u64, cap: usize },
    #[error("the answer exceeds the limit of {cap} bytes")]
    TooLarge { cap: usize },
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

/// The whole body of `response`, or an error once it is known to exceed `cap` bytes.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Bytes, CappedReadError> {
    if let Some(declared) = response.content_length() {
        if usize::try_from(declared).map_or(true, |declared| declared > cap) {
            return Err(CappedReadError::DeclaredTooLarge { declared, cap });
        }
        // hyper stops at the declared length: at most `cap` bytes.
        return Ok(response.bytes().await?);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if chunk.len() > cap - body.len() {
            return Err(CappedReadError::TooLarge { cap });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// At most the first `cap` bytes of `response`'s body (an error answer, read for its message);
/// the rest is never read. A body broken midway yields what arrived.
pub async fn read_prefix(mut response: reqwest::Response, cap: usize) -> Bytes {
    let mut body = BytesMut::new();
    while body.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = cap - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body.freeze()
}
