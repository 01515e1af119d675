//! Reading upstream bodies under a size cap (DESIGN §19): a declared `Content-Length` over the cap
//! is refused before a byte is read, an undeclared one is read up to the cap and then refused, so
//! no upstream can make the gateway buffer more than the cap.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most bytes of an upstream error answer (non-2xx) kept for its message.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Why an upstream body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum CappedReadError {
    #[error("the answer declares {declared} bytes, over the limit of {cap} bytes")]
    DeclaredTooLarge { declared: u64, cap: usize },
    #[error("the answer exceeds the limit of {cap} bytes")]
    TooLarge { cap: usize },
    /// The connection failed midway (its causes on one line).
    #[error("{0}")]
    Broken(String),
}

impl CappedReadError {
    fn broken(err: BoxError) -> Self {
        // reqwest names the URL in its errors; some providers take keys in the query.
        let err = match err.downcast::<reqwest::Error>() {
            Ok(err) => Box::new((*err).without_url()) as BoxError,
            Err(err) => err,
        };
        Self::Broken(crate::upstream_http::error_chain(&*err))
    }
}

/// The whole of `body`, or an error once it is known to exceed `cap` bytes.
pub async fn read_capped<B>(mut body: B, cap: usize) -> Result<Bytes, CappedReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let broken = |err: B::Error| CappedReadError::broken(err.into());
    if let Some(declared) = body.size_hint().exact() {
        if usize::try_from(declared).map_or(true, |declared| declared > cap) {
            return Err(CappedReadError::DeclaredTooLarge { declared, cap });
        }
        // hyper stops at the declared length: at most `cap` bytes. One chunk is kept as it is.
        return Ok(body.collect().await.map_err(broken)?.to_bytes());
    }
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(broken)?.into_data() else {
            continue; // trailers
        };
        if chunk.len() > cap - out.len() {
            return Err(CappedReadError::TooLarge { cap });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// At most the first `cap` bytes of `body` (an error answer, read for its message); the rest is
/// never read. A body broken midway yields what arrived.
pub async fn read_prefix<B>(mut body: B, cap: usize) -> Bytes
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut out = BytesMut::new();
    while out.len() < cap {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(chunk) = frame.into_data() {
                    let room = cap - out.len();
                    out.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    out.freeze()
}
