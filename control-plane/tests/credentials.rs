//! Provider credentials at rest (DESIGN §9), checked against the real Postgres rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use llm_proxy_control_plane::schema::connections;
use llm_proxy_control_plane::server::{self, ServerError};
use llm_proxy_proto::v1::CreateConnectionRequest;
use secrecy::{ExposeSecret as _, SecretString};

const SECRETS: [(&str, &str); 2] = [
    ("OpenAI", "sk-proj-PLAINTEXT-ONE-1234567890"),
    ("Azure", "azure-PLAINTEXT-TWO-abcdef"),
];

/// A Postgres database holding two connections written under `master_key`.
async fn database_with_credentials(master_key: &SecretString) -> common::TestDb {
    let db = common::fresh_postgres().await;
    let cp = server::start(common::settings(&db, master_key))
        .await
        .unwrap();
    let mut admin = common::admin(&cp, None).await;
    for (name, secret) in SECRETS {
        admin
            .create_connection(CreateConnectionRequest {
                name: name.into(),
                provider: if name == "Azure" { "azure" } else { "openai" }.into(),
                endpoint: "https://example.com".into(),
                credential: secret.into(),
                options: Default::default(),
            })
            .await
            .unwrap();
    }
    cp.shutdown().await;
    db
}

async fn stored_rows(db: &common::TestDb) -> Vec<(String, String, Vec<u8>)> {
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    diesel_async::RunQueryDsl::load(
        connections::table
            .select((connections::id, connections::name, connections::credential))
            .order(connections::name.asc()),
        &mut conn,
    )
    .await
    .unwrap()
}

fn joined(keys: &[&SecretString]) -> SecretString {
    SecretString::from(
        keys.iter()
            .map(|k| k.expose_secret().to_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

async fn snapshot_credentials(db: &common::TestDb, key: &SecretString) -> Vec<(String, String)> {
    let cp = server::start(common::settings(db, key)).await.unwrap();
    let built = llm_proxy_control_plane::hub::build_snapshot(&cp.store, 0)
        .await
        .unwrap();
    cp.shutdown().await;
    assert_eq!(built.undecryptable, Vec::<String>::new());
    let mut creds: Vec<(String, String)> = built
        .snapshot
        .connections
        .into_iter()
        .map(|c| (c.name, c.credential))
        .collect();
    creds.sort();
    creds
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_credential_column_never_holds_the_plaintext() {
    let key = common::new_master_key();
    let db = database_with_credentials(&key).await;
    let rows = stored_rows(&db).await;
    assert_eq!(rows.len(), 2);
    for (_, _, stored) in &rows {
        for (_, secret) in SECRETS {
            let needle = &secret.as_bytes()[..12];
            assert!(!stored.windows(needle.len()).any(|w| w == needle));
        }
        assert_eq!(stored[0], 1, "format version byte");
    }
    // ...and yet the control plane reads them back.
    let creds = snapshot_credentials(&db, &key).await;
    assert_eq!(
        creds,
        [
            ("Azure".to_owned(), SECRETS[1].1.to_owned()),
            ("OpenAI".to_owned(), SECRETS[0].1.to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ciphertext_moved_to_another_row_does_not_decrypt() {
    let key = common::new_master_key();
    let db = database_with_credentials(&key).await;
    let rows = stored_rows(&db).await;
    let (azure_id, _, azure_blob) = &rows[0];
    let openai_id = &rows[1].0;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    // Copy Azure's ciphertext into the OpenAI row, as an attacker with DB write access might.
    diesel_async::RunQueryDsl::execute(
        diesel::update(connections::table.filter(connections::name.eq("OpenAI")))
            .set(connections::credential.eq(azure_blob)),
        &mut conn,
    )
    .await
    .unwrap();
    // The control plane still starts; its snapshots leave out only the row that does not open.
    let cp = server::start(common::settings(&db, &key)).await.unwrap();
    let built = llm_proxy_control_plane::hub::build_snapshot(&cp.store, 0)
        .await
        .unwrap();
    cp.shutdown().await;
    assert_eq!(built.undecryptable, std::slice::from_ref(openai_id));
    let names: Vec<&str> = built
        .snapshot
        .connections
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["Azure"]);
    // Rotation still needs every row to open.
    let err = server::rotate_master_key(&db.secret_url(), &key)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ServerError::CredentialCheck(_)), "{message}");
    assert!(message.contains("does not decrypt"), "{message}");
    assert!(
        !message.contains(azure_id),
        "names the row it was moved to, not from: {message}"
    );
    for (_, secret) in SECRETS {
        assert!(!message.contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_master_key_fails_with_a_clear_error() {
    let key = common::new_master_key();
    let db = database_with_credentials(&key).await;
    let wrong = common::new_master_key();
    let err = server::start(common::settings(&db, &wrong))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with("master key check failed"), "{message}");
    assert!(message.contains("which is not configured"), "{message}");
    assert!(!message.contains(wrong.expose_secret()) && !message.contains(key.expose_secret()));
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_every_connection_readable() {
    let old = common::new_master_key();
    let db = database_with_credentials(&old).await;
    let new = common::new_master_key();
    let before: Vec<Vec<u8>> = stored_rows(&db).await.into_iter().map(|r| r.2).collect();

    let (count, active) = server::rotate_master_key(&db.secret_url(), &joined(&[&new, &old]))
        .await
        .unwrap();
    assert_eq!(count, 2);
    let after: Vec<Vec<u8>> = stored_rows(&db).await.into_iter().map(|r| r.2).collect();
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a, "every row re-encrypted");
        assert_eq!(
            llm_proxy_control_plane::crypto::MasterKeys::stored_key_id(a).unwrap(),
            active
        );
    }
    // The old key can now be removed: the new one alone reads everything.
    let creds = snapshot_credentials(&db, &new).await;
    assert_eq!(creds.len(), 2);
    assert!(
        creds
            .iter()
            .any(|(n, c)| n == "OpenAI" && c == SECRETS[0].1)
    );
    assert!(creds.iter().any(|(n, c)| n == "Azure" && c == SECRETS[1].1));
    // And the old key alone no longer does.
    assert!(server::start(common::settings(&db, &old)).await.is_err());
}
