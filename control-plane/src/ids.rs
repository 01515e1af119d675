//! Resource IDs (`conn-`, `model-`, `vkey-`, `asg-` + 20 base32 characters) and virtual keys.

use rand::Rng as _;
use sha2::{Digest, Sha256};

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

/// A new ID with the given prefix (`conn`, `model`, `vkey`, `asg`): 100 random bits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_string(BASE32, 20))
}

/// A generated virtual key: `vk-` + 40 base62 characters (~238 bits).
pub fn generate_virtual_key() -> String {
    format!("vk-{}", random_string(BASE62, 40))
}

pub fn key_sha256(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A hint that lets a human recognise a key without revealing it: `vk-fr…1234`.
pub fn key_hint(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 10 {
        // Too short to show both ends without revealing most of it.
        let head: String = chars.iter().take(2).collect();
        return format!("{head}…");
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_20_base32_chars() {
        let id = new_id("conn");
        let (prefix, rest) = id.split_once('-').unwrap();
        assert_eq!(prefix, "conn");
        assert_eq!(rest.len(), 20);
        assert!(rest.bytes().all(|b| BASE32.contains(&b)));
        assert_ne!(new_id("conn"), new_id("conn"));
    }

    #[test]
    fn generated_keys_are_long_base62() {
        let key = generate_virtual_key();
        assert!(key.starts_with("vk-"));
        assert_eq!(key.len(), 43);
        assert!(key[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn hint_shows_only_the_ends() {
        assert_eq!(key_hint("vk-front-1234"), "vk-fr…1234");
        assert_eq!(key_hint("vk-short"), "vk…");
    }
}
