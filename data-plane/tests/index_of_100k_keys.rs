//! Applying a 100k-key snapshot: builds the index from a snapshot shaped like the control plane's
//! and checks every key authenticates to its alias; prints the build time (figure for the docs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use llm_proxy_data_plane::index::ConfigIndex;
use llm_proxy_proto::v1::{
    Snapshot, SnapshotAssignment, SnapshotConnection, SnapshotModel, SnapshotVirtualKey,
};
use sha2::{Digest, Sha256};
use std::time::Instant;

const KEYS: usize = 100_000;

#[test]
fn a_100k_key_snapshot_applies_and_every_key_resolves() {
    let snapshot = Snapshot {
        cluster_epoch: "epoch".into(),
        version: 7,
        connections: vec![SnapshotConnection {
            id: "conn-aaaaaaaaaaaaaaaaaaaa".into(),
            name: "OpenAI".into(),
            provider: "openai".into(),
            endpoint: "https://api.openai.com".into(),
            credential: "sk-x".into(),
            options: Default::default(),
        }],
        models: vec![SnapshotModel {
            id: "model-aaaaaaaaaaaaaaaaaaaa".into(),
            connection_id: "conn-aaaaaaaaaaaaaaaaaaaa".into(),
            name: "gpt-4o-mini".into(),
            remote: "gpt-4o-mini".into(),
            deployment: None,
            ..Default::default()
        }],
        virtual_keys: (0..KEYS)
            .map(|i| SnapshotVirtualKey {
                id: format!("vkey-{i:020}"),
                name: format!("team-{i:06}"),
                key_sha256: Sha256::digest(format!("vk-team-{i:06}")).to_vec(),
                enabled: true,
                expires_at_unix: None,
                ..Default::default()
            })
            .collect(),
        assignments: (0..KEYS)
            .map(|i| SnapshotAssignment {
                id: format!("asg-{i:020}"),
                vkey_id: format!("vkey-{i:020}"),
                model_id: "model-aaaaaaaaaaaaaaaaaaaa".into(),
                alias: "gpt-4o-mini".into(),
                tps: Some(10),
                burst: None,
                tpm: Some(100_000),
                weight: 1,
            })
            .collect(),
        live_data_planes: 1,
        more: false,
        part: 0,
    };
    let started = Instant::now();
    let index = ConfigIndex::build(snapshot).unwrap();
    let built = started.elapsed();
    assert_eq!(index.key_count(), KEYS);
    for i in (0..KEYS).step_by(997) {
        let key = index.authenticate(&format!("vk-team-{i:06}"), 0).unwrap();
        assert!(key.pool("gpt-4o-mini").is_some());
    }
    println!("100k-key index built in {built:?}");
}
