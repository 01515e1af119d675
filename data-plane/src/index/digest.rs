//! The lookup key of virtual keys: half their SHA-256, hashed without SipHash.

use super::*;

/// The first 128 bits of a virtual key's SHA-256, the lookup key of [`ConfigIndex`]. Half the
/// digest keeps the table small (20 bytes a slot instead of 36) and is still far beyond reach: a
/// presented key matching a stored one on 128 bits of SHA-256 takes ~2^128 attempts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct KeyDigest([u8; 16]);

impl KeyDigest {
    pub(super) fn of(sha256: &[u8; 32]) -> Self {
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&sha256[..16]);
        Self(prefix)
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Hasher for [`KeyDigest`]: the digest is already uniformly distributed, so its first 8 bytes are
/// the hash (no SipHash round on the hot path). Lookups cannot be steered into collisions cheaply
/// either: the presented key goes through SHA-256 first, and the table's contents come from the
/// control plane, not from callers.
#[derive(Default)]
pub(super) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `KeyDigest` is hashed; FNV-1a keeps it correct.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Digest -> position in `ConfigIndex::keys`.
pub(super) type KeyMap = HashMap<KeyDigest, u32, BuildHasherDefault<DigestHasher>>;
