//! Loading the master key from a flag/env or a file, and creating one for the embedded mode.

use crate::crypto::{CryptoError, MasterKeys};
use secrecy::{ExposeSecret as _, SecretString};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt as _;

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error(
        "a master key is required: set --master-key (LLM_PROXY_MASTER_KEY) or --master-key-file (LLM_PROXY_MASTER_KEY_FILE) to base64 of 64 random bytes, e.g. from `head -c 64 /dev/urandom | base64 -w0`"
    )]
    Missing,
    #[error("give either --master-key or --master-key-file, not both")]
    Both,
    #[error("cannot read master key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create master key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("master key file {path}: {source}")]
    Invalid { path: PathBuf, source: CryptoError },
}

/// The master key text from exactly one of the two sources (surrounding whitespace ignored).
pub async fn load(
    inline: Option<SecretString>,
    file: Option<&Path>,
) -> Result<SecretString, MasterKeyError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(MasterKeyError::Both),
        (None, None) => Err(MasterKeyError::Missing),
        (Some(key), None) => Ok(SecretString::from(key.expose_secret().trim().to_owned())),
        (None, Some(path)) => read_key_file(path).await,
    }
}

async fn read_key_file(path: &Path) -> Result<SecretString, MasterKeyError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| MasterKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(SecretString::from(text.trim().to_owned()))
}

/// Reads `path`, or creates it with a new random key (mode 0600) when it does not exist.
pub async fn load_or_create(path: &Path) -> Result<(SecretString, bool), MasterKeyError> {
    match tokio::fs::metadata(path).await {
        Ok(_) => {
            let key = read_key_file(path).await?;
            MasterKeys::parse(&key).map_err(|source| MasterKeyError::Invalid {
                path: path.to_owned(),
                source,
            })?;
            Ok((key, false))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let key = MasterKeys::generate_encoded();
            let create = |source| MasterKeyError::Create {
                path: path.to_owned(),
                source,
            };
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .await
                .map_err(create)?;
            file.write_all(format!("{}\n", key.expose_secret()).as_bytes())
                .await
                .map_err(create)?;
            file.sync_all().await.map_err(create)?;
            Ok((key, true))
        }
        Err(source) => Err(MasterKeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[tokio::test]
    async fn creates_a_private_key_file_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (first, created) = load_or_create(&path).await.unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (second, created) = load_or_create(&path).await.unwrap();
        assert!(!created);
        assert_eq!(first.expose_secret(), second.expose_secret());
        assert!(MasterKeys::parse(&first).is_ok());
    }

    #[tokio::test]
    async fn exactly_one_source() {
        assert!(matches!(
            load(None, None).await,
            Err(MasterKeyError::Missing)
        ));
        let both = load(Some(SecretString::from("x")), Some(Path::new("/nope"))).await;
        assert!(matches!(both, Err(MasterKeyError::Both)));
        let missing = load(None, Some(Path::new("/nonexistent/key"))).await;
        assert!(matches!(missing, Err(MasterKeyError::Read { .. })));
    }
}
