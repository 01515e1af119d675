//! Provider credentials at rest: AES-256-SIV under a master key (DESIGN §9).
//!
//! Stored bytes: `version (1) ‖ key id (4) ‖ nonce (16) ‖ ciphertext+tag`. The associated data binds
//! the ciphertext to its table, column, row id and key id, so a ciphertext copied to another row
//! (or relabelled with another key id) does not decrypt. Several master keys may be configured: the
//! first encrypts, all decrypt, which is how rotation works.

use aes_siv::aead::{Aead, KeyInit, Payload};
use aes_siv::{Aes256SivAead, Nonce};
use base64::Engine as _;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretString};
use sha2::{Digest, Sha256};

const FORMAT_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// AES-256-SIV takes two AES-256 keys: 64 bytes.
pub const MASTER_KEY_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key #{index} is not valid base64")]
    KeyNotBase64 { index: usize },
    #[error("master key #{index} decodes to {len} bytes; it must be base64 of exactly 64 bytes")]
    KeyWrongLength { index: usize, len: usize },
    #[error("no master key configured")]
    NoKey,
    #[error("stored {what} has an unknown format (version byte {version}, {len} bytes)")]
    BadFormat {
        what: String,
        version: u8,
        len: usize,
    },
    #[error(
        "stored {what} was encrypted with master key id {key_id}, which is not configured (configured: {configured})"
    )]
    UnknownKeyId {
        what: String,
        key_id: String,
        configured: String,
    },
    #[error(
        "stored {what} does not decrypt with master key id {key_id}: wrong master key, or the value was tampered with or copied from another row"
    )]
    DecryptFailed { what: String, key_id: String },
    #[error("stored {what} is not valid UTF-8 after decryption")]
    NotUtf8 { what: String },
    #[error("encryption failed")]
    EncryptFailed,
}

/// Where a ciphertext lives; part of the associated data.
#[derive(Debug, Clone, Copy)]
pub struct Location<'a> {
    pub table: &'a str,
    pub column: &'a str,
    pub row_id: &'a str,
}

impl Location<'_> {
    fn describe(&self) -> String {
        format!("{}.{} of {}", self.table, self.column, self.row_id)
    }

    fn associated_data(&self, key_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64);
        aad.extend_from_slice(b"llm-proxy/v1/");
        for part in [self.table, self.column, self.row_id] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad.push(FORMAT_VERSION);
        aad.extend_from_slice(key_id);
        aad
    }
}

struct MasterKey {
    id: [u8; KEY_ID_LEN],
    cipher: Aes256SivAead,
}

/// The configured master keys; the first one is active.
pub struct MasterKeys {
    keys: Vec<MasterKey>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeys")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl MasterKeys {
    /// Parses a comma-separated list of base64 keys (surrounding whitespace ignored).
    pub fn parse(text: &SecretString) -> Result<Self, CryptoError> {
        let mut keys = Vec::new();
        for (index, part) in text.expose_secret().split(',').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let raw = SecretBox::new(Box::new(
                base64::engine::general_purpose::STANDARD
                    .decode(part)
                    .map_err(|_| CryptoError::KeyNotBase64 { index: index + 1 })?,
            ));
            let bytes = raw.expose_secret();
            if bytes.len() != MASTER_KEY_LEN {
                return Err(CryptoError::KeyWrongLength {
                    index: index + 1,
                    len: bytes.len(),
                });
            }
            let digest = Sha256::digest(bytes);
            let mut id = [0u8; KEY_ID_LEN];
            id.copy_from_slice(&digest[..KEY_ID_LEN]);
            let cipher =
                Aes256SivAead::new_from_slice(bytes).map_err(|_| CryptoError::KeyWrongLength {
                    index: index + 1,
                    len: bytes.len(),
                })?;
            keys.push(MasterKey { id, cipher });
        }
        if keys.is_empty() {
            return Err(CryptoError::NoKey);
        }
        Ok(Self { keys })
    }

    /// A new random key, base64 of 64 bytes.
    pub fn generate_encoded() -> SecretString {
        let mut bytes = SecretBox::new(Box::new([0u8; MASTER_KEY_LEN]));
        rand::fill(bytes.expose_secret_mut());
        SecretString::from(base64::engine::general_purpose::STANDARD.encode(bytes.expose_secret()))
    }

    /// Hex ids of the configured keys, active first. Safe to log.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.id)).collect()
    }

    pub fn active_key_id(&self) -> String {
        self.keys.first().map(|k| hex(&k.id)).unwrap_or_default()
    }

    pub fn encrypt(&self, at: Location<'_>, plaintext: &str) -> Result<Vec<u8>, CryptoError> {
        let key = self.keys.first().ok_or(CryptoError::NoKey)?;
        let mut nonce_bytes = [0u8; NONCE_LEN];
        rand::fill(&mut nonce_bytes);
        let nonce = Nonce::from(nonce_bytes);
        let aad = at.associated_data(&key.id);
        let sealed = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::EncryptFailed)?;
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn decrypt(&self, at: Location<'_>, stored: &[u8]) -> Result<SecretString, CryptoError> {
        let version = stored.first().copied().unwrap_or(0);
        if version != FORMAT_VERSION || stored.len() < HEADER_LEN + 16 {
            return Err(CryptoError::BadFormat {
                what: at.describe(),
                version,
                len: stored.len(),
            });
        }
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&stored[1..1 + KEY_ID_LEN]);
        let key =
            self.keys
                .iter()
                .find(|k| k.id == key_id)
                .ok_or_else(|| CryptoError::UnknownKeyId {
                    what: at.describe(),
                    key_id: hex(&key_id),
                    configured: self.key_ids().join(","),
                })?;
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(&stored[1 + KEY_ID_LEN..HEADER_LEN]);
        let nonce = Nonce::from(nonce_bytes);
        let aad = at.associated_data(&key_id);
        let plain = key
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &stored[HEADER_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::DecryptFailed {
                what: at.describe(),
                key_id: hex(&key_id),
            })?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CryptoError::NotUtf8 {
                what: at.describe(),
            })
    }

    /// The key id a stored value was encrypted under, if it has our format.
    pub fn stored_key_id(stored: &[u8]) -> Option<String> {
        (stored.len() >= HEADER_LEN && stored[0] == FORMAT_VERSION)
            .then(|| hex(&stored[1..1 + KEY_ID_LEN]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&SecretString]) -> MasterKeys {
        let joined = list
            .iter()
            .map(|k| k.expose_secret().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        MasterKeys::parse(&SecretString::from(joined)).unwrap()
    }

    const AT: Location<'static> = Location {
        table: "connections",
        column: "credential",
        row_id: "conn-a",
    };

    #[test]
    fn round_trip_and_ciphertext_hides_plaintext() {
        let k = keys(&[&MasterKeys::generate_encoded()]);
        let stored = k.encrypt(AT, "sk-secret-value-123").unwrap();
        assert!(!stored.windows(6).any(|w| w == b"sk-sec"));
        assert_eq!(
            k.decrypt(AT, &stored).unwrap().expose_secret(),
            "sk-secret-value-123"
        );
        assert_eq!(
            MasterKeys::stored_key_id(&stored).unwrap(),
            k.active_key_id()
        );
    }

    #[test]
    fn ciphertext_moved_to_another_row_fails() {
        let k = keys(&[&MasterKeys::generate_encoded()]);
        let stored = k.encrypt(AT, "sk-secret").unwrap();
        let other = Location {
            row_id: "conn-b",
            ..AT
        };
        let err = k.decrypt(other, &stored).unwrap_err();
        assert!(matches!(err, CryptoError::DecryptFailed { .. }), "{err}");
        let other_column = Location {
            column: "options",
            ..AT
        };
        assert!(k.decrypt(other_column, &stored).is_err());
    }

    #[test]
    fn wrong_master_key_is_a_clear_error() {
        let k1 = keys(&[&MasterKeys::generate_encoded()]);
        let k2 = keys(&[&MasterKeys::generate_encoded()]);
        let stored = k1.encrypt(AT, "sk-secret").unwrap();
        let msg = k2.decrypt(AT, &stored).unwrap_err().to_string();
        assert!(msg.contains("not configured"), "{msg}");
        assert!(msg.contains(&k1.active_key_id()), "{msg}");
        assert!(!msg.contains("sk-secret"));
    }

    #[test]
    fn tampered_key_id_or_bytes_fail() {
        let k = keys(&[&MasterKeys::generate_encoded()]);
        let mut stored = k.encrypt(AT, "sk-secret").unwrap();
        let last = stored.len() - 1;
        stored[last] ^= 1;
        assert!(matches!(
            k.decrypt(AT, &stored),
            Err(CryptoError::DecryptFailed { .. })
        ));
        assert!(matches!(
            k.decrypt(AT, &[1, 2, 3]),
            Err(CryptoError::BadFormat { .. })
        ));
    }

    #[test]
    fn old_key_still_decrypts_after_rotation_and_new_key_encrypts() {
        let old = MasterKeys::generate_encoded();
        let new = MasterKeys::generate_encoded();
        let before = keys(&[&old]);
        let stored = before.encrypt(AT, "sk-secret").unwrap();
        let during = keys(&[&new, &old]);
        assert_eq!(
            during.decrypt(AT, &stored).unwrap().expose_secret(),
            "sk-secret"
        );
        let re = during.encrypt(AT, "sk-secret").unwrap();
        assert_eq!(
            MasterKeys::stored_key_id(&re).unwrap(),
            during.active_key_id()
        );
        let after = keys(&[&new]);
        assert!(after.decrypt(AT, &stored).is_err());
        assert_eq!(after.decrypt(AT, &re).unwrap().expose_secret(), "sk-secret");
    }

    #[test]
    fn bad_master_keys_are_rejected_with_position() {
        let err = MasterKeys::parse(&SecretString::from("not base64!!")).unwrap_err();
        assert_eq!(err.to_string(), "master key #1 is not valid base64");
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        let err = MasterKeys::parse(&SecretString::from(short)).unwrap_err();
        assert!(err.to_string().contains("decodes to 32 bytes"), "{err}");
        assert!(matches!(
            MasterKeys::parse(&SecretString::from("  ")),
            Err(CryptoError::NoKey)
        ));
        let padded = format!("  {}\n", MasterKeys::generate_encoded().expose_secret());
        assert!(MasterKeys::parse(&SecretString::from(padded)).is_ok());
    }
}
