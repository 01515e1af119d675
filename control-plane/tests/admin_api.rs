//! The admin API's CRUD and validation suite, run unchanged on Postgres and on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Admin, Backend};
use llm_proxy_proto::Timestamp;
use llm_proxy_proto::v1::*;
use std::collections::HashMap;
use tonic::Code;

async fn version(cp: &llm_proxy_control_plane::server::RunningControlPlane) -> i64 {
    cp.store.current_version().await.unwrap().1
}

fn options(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn add_connection(
    admin: &mut Admin,
    name: &str,
    provider: &str,
    endpoint: &str,
    opts: &[(&str, &str)],
) -> Connection {
    admin
        .create_connection(CreateConnectionRequest {
            name: name.into(),
            provider: provider.into(),
            endpoint: endpoint.into(),
            credential: format!("secret-of-{name}"),
            options: options(opts),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn add_model(
    admin: &mut Admin,
    conn: &str,
    name: &str,
    deployment: Option<&str>,
) -> ProviderModel {
    admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: conn.into(),
            name: name.into(),
            remote: format!("{name}-remote"),
            deployment: deployment.map(Into::into),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn add_key(admin: &mut Admin, name: &str, key: Option<&str>) -> CreateVirtualKeyResponse {
    admin
        .create_virtual_key(CreateVirtualKeyRequest {
            name: name.into(),
            key: key.map(Into::into),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn get(id: &str) -> GetRequest {
    GetRequest { id: id.into() }
}

fn delete(id: &str, force: bool) -> DeleteRequest {
    DeleteRequest {
        id: id.into(),
        force,
    }
}

/// Asserts the status code and that the message names `field`.
fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, field: &str) {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} should name {field:?}",
        status.message()
    );
}

async fn connections_crud(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let v0 = version(&cp).await;

    let openai = add_connection(
        &mut admin,
        "OpenAI-Main",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    assert!(
        openai.id.starts_with("conn-") && openai.id.len() == 25,
        "{}",
        openai.id
    );
    assert_eq!(version(&cp).await, v0 + 1);
    let azure = add_connection(
        &mut admin,
        "Azure-East",
        "azure",
        "https://my-res.openai.azure.com",
        &[("api_version", "2024-10-21")],
    )
    .await;
    let gemini = add_connection(
        &mut admin,
        "Gemini",
        "google",
        "https://generativelanguage.googleapis.com",
        &[],
    )
    .await;
    let vertex = add_connection(
        &mut admin,
        "Vertex",
        "google",
        "https://aiplatform.googleapis.com",
        &[("project", "my-proj"), ("location", "us-central1")],
    )
    .await;
    assert_eq!(version(&cp).await, v0 + 4);
    assert_eq!(
        vertex.options.get("location").map(String::as_str),
        Some("us-central1")
    );
    assert_eq!(azure.provider, "azure");

    // Get by ID and by name.
    let by_id = admin
        .get_connection(get(&gemini.id))
        .await
        .unwrap()
        .into_inner();
    let by_name = admin
        .get_connection(get("Gemini"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id, by_name);
    assert_eq!(by_id.endpoint, "https://generativelanguage.googleapis.com");

    let list = admin
        .list_connections(ListConnectionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .connections;
    let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["Azure-East", "Gemini", "OpenAI-Main", "Vertex"]);

    let updated = admin
        .update_connection(UpdateConnectionRequest {
            id: "Azure-East".into(),
            name: Some("Azure-West".into()),
            endpoint: Some("https://west.openai.azure.com/".into()),
            credential: Some("new-secret".into()),
            set_options: options(&[("timeout_s", "30")]),
            unset_options: vec!["api_version".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.id, azure.id);
    assert_eq!(updated.name, "Azure-West");
    assert_eq!(updated.endpoint, "https://west.openai.azure.com");
    assert_eq!(updated.options, options(&[("timeout_s", "30")]));
    assert!(updated.updated_at.unwrap().seconds >= updated.created_at.unwrap().seconds);
    assert_eq!(version(&cp).await, v0 + 5);

    let deleted = admin
        .delete_connection(delete("OpenAI-Main", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.id, openai.id);
    assert_eq!(deleted.version, v0 + 6);
    assert_status(
        admin.get_connection(get(&openai.id)).await,
        Code::NotFound,
        &openai.id,
    );
    cp.shutdown().await;
}

async fn models_crud(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let openai = add_connection(
        &mut admin,
        "OpenAI-Main",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    add_connection(
        &mut admin,
        "Azure",
        "azure",
        "https://r.openai.azure.com",
        &[],
    )
    .await;

    let gpt = add_model(&mut admin, "OpenAI-Main", "gpt-4-turbo", None).await;
    assert!(gpt.id.starts_with("model-"));
    assert_eq!(gpt.connection_id, openai.id);
    assert_eq!(gpt.remote, "gpt-4-turbo-remote");
    assert_eq!(gpt.deployment, None);
    let az = add_model(&mut admin, "Azure", "gpt-4o", Some("gpt4o-prod")).await;
    assert_eq!(az.deployment.as_deref(), Some("gpt4o-prod"));
    let az_dup_name = add_model(&mut admin, &openai.id, "gpt-4o", None).await;

    // Names: CONNECTION/MODEL, unique bare name, ambiguous bare name.
    let got = admin
        .get_provider_model(get("Azure/gpt-4o"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, az.id);
    let got = admin
        .get_provider_model(get("gpt-4-turbo"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, gpt.id);
    let ambiguous = admin.get_provider_model(get("gpt-4o")).await.unwrap_err();
    assert_eq!(ambiguous.code(), Code::InvalidArgument);
    assert!(
        ambiguous.message().contains("ambiguous"),
        "{}",
        ambiguous.message()
    );
    assert!(
        ambiguous.message().contains("Azure/gpt-4o"),
        "{}",
        ambiguous.message()
    );
    assert!(
        ambiguous.message().contains("OpenAI-Main/gpt-4o"),
        "{}",
        ambiguous.message()
    );

    let list = admin
        .list_provider_models(ListProviderModelsRequest {
            connection_id: "OpenAI-Main".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    let ids: Vec<&str> = list.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [gpt.id.as_str(), az_dup_name.id.as_str()]);
    let all = admin
        .list_provider_models(ListProviderModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(all.len(), 3);

    let updated = admin
        .update_provider_model(UpdateProviderModelRequest {
            id: az.id.clone(),
            name: Some("gpt-4o-azure".into()),
            remote: Some("gpt-4o-2024-08-06".into()),
            deployment: Some(String::new()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.name, "gpt-4o-azure");
    assert_eq!(updated.remote, "gpt-4o-2024-08-06");
    assert_eq!(updated.deployment, None, "empty deployment clears it");

    admin
        .delete_provider_model(delete("gpt-4o-azure", false))
        .await
        .unwrap();
    assert_status(
        admin.get_provider_model(get(&az.id)).await,
        Code::NotFound,
        &az.id,
    );
    cp.shutdown().await;
}

/// The four prices of a model, in the order input, output, cache read, cache write.
fn prices(m: &ProviderModel) -> [Option<i64>; 4] {
    [
        m.price_input,
        m.price_output,
        m.price_cache_read,
        m.price_cache_write,
    ]
}

fn set_price(micro_usd_per_million: i64) -> Option<PriceUpdate> {
    Some(PriceUpdate {
        micro_usd_per_million: Some(micro_usd_per_million),
    })
}

fn unset_price() -> Option<PriceUpdate> {
    Some(PriceUpdate {
        micro_usd_per_million: None,
    })
}

/// Prices (DESIGN §18): stored in micro-USD per million tokens, returned by every read, changed
/// one by one (set, unset, left alone) by updates, bounded, and carried by the snapshot.
async fn model_prices(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    add_connection(
        &mut admin,
        "OpenAI",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;

    // gpt-4o: $2.50 in, $10 out, $1.25 cached; no cache-write price.
    let gpt = admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: "OpenAI".into(),
            name: "gpt-4o".into(),
            remote: "gpt-4o".into(),
            price_input: Some(2_500_000),
            price_output: Some(10_000_000),
            price_cache_read: Some(1_250_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        prices(&gpt),
        [Some(2_500_000), Some(10_000_000), Some(1_250_000), None]
    );
    // A model without prices, and a free one (0 is a price).
    let plain = add_model(&mut admin, "OpenAI", "plain", None).await;
    assert_eq!(prices(&plain), [None; 4]);
    let free = admin
        .create_provider_model(CreateProviderModelRequest {
            connection_id: "OpenAI".into(),
            name: "free".into(),
            remote: "llama".into(),
            price_input: Some(0),
            price_output: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prices(&free), [Some(0), Some(0), None, None]);

    // Reads return what was stored.
    let got = admin
        .get_provider_model(get("OpenAI/gpt-4o"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prices(&got), prices(&gpt));
    let listed = admin
        .list_provider_models(ListProviderModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let by_name: HashMap<&str, [Option<i64>; 4]> = listed
        .iter()
        .map(|m| (m.name.as_str(), prices(m)))
        .collect();
    assert_eq!(by_name["gpt-4o"], prices(&gpt));
    assert_eq!(by_name["plain"], [None; 4]);
    assert_eq!(by_name["free"], [Some(0), Some(0), None, None]);

    // An update without prices leaves them alone.
    let renamed = admin
        .update_provider_model(UpdateProviderModelRequest {
            id: gpt.id.clone(),
            remote: Some("gpt-4o-2024-08-06".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prices(&renamed), prices(&gpt));
    // Set one, unset another, leave the rest.
    let repriced = admin
        .update_provider_model(UpdateProviderModelRequest {
            id: gpt.id.clone(),
            price_output: set_price(8_000_000),
            price_cache_read: unset_price(),
            price_cache_write: set_price(3_125_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        prices(&repriced),
        [Some(2_500_000), Some(8_000_000), None, Some(3_125_000)]
    );
    assert_eq!(
        prices(
            &admin
                .get_provider_model(get(&gpt.id))
                .await
                .unwrap()
                .into_inner()
        ),
        prices(&repriced)
    );

    // Out of range: refused with the field named, nothing changed.
    let max = llm_proxy_control_plane::validate::MAX_PRICE_MICRO_USD_PER_MILLION;
    let create = |field: &str, value: i64| {
        let mut request = CreateProviderModelRequest {
            connection_id: "OpenAI".into(),
            name: "bad".into(),
            remote: "bad".into(),
            ..Default::default()
        };
        match field {
            "price_input" => request.price_input = Some(value),
            "price_output" => request.price_output = Some(value),
            "price_cache_read" => request.price_cache_read = Some(value),
            _ => request.price_cache_write = Some(value),
        }
        request
    };
    for field in [
        "price_input",
        "price_output",
        "price_cache_read",
        "price_cache_write",
    ] {
        for value in [-1, i64::MIN, max + 1] {
            assert_status(
                admin.create_provider_model(create(field, value)).await,
                Code::InvalidArgument,
                field,
            );
        }
    }
    let negative = admin
        .update_provider_model(UpdateProviderModelRequest {
            id: gpt.id.clone(),
            price_input: set_price(-2_500_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert_eq!(
        negative.message(),
        "price_input must not be negative, got -2500000 micro-USD per million tokens"
    );
    assert_status(
        admin
            .update_provider_model(UpdateProviderModelRequest {
                id: gpt.id.clone(),
                price_cache_write: set_price(max + 1),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "price_cache_write",
    );
    // The bound itself is a price.
    let dearest = admin
        .update_provider_model(UpdateProviderModelRequest {
            id: free.id.clone(),
            price_output: set_price(max),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dearest.price_output, Some(max));
    assert_eq!(
        prices(
            &admin
                .get_provider_model(get(&gpt.id))
                .await
                .unwrap()
                .into_inner()
        ),
        prices(&repriced)
    );

    // The snapshot carries the prices to the data planes.
    let built = llm_proxy_control_plane::hub::build_snapshot(&cp.store, 0)
        .await
        .unwrap();
    let snapshot_prices: HashMap<String, [Option<i64>; 4]> = built
        .snapshot
        .models
        .into_iter()
        .map(|m| {
            (
                m.name,
                [
                    m.price_input,
                    m.price_output,
                    m.price_cache_read,
                    m.price_cache_write,
                ],
            )
        })
        .collect();
    assert_eq!(snapshot_prices["gpt-4o"], prices(&repriced));
    assert_eq!(snapshot_prices["plain"], [None; 4]);
    assert_eq!(snapshot_prices["free"], [Some(0), Some(max), None, None]);
    cp.shutdown().await;
}

fn budget_of(k: &VirtualKey) -> (Option<i64>, Option<&str>) {
    (k.budget_micro_usd, k.budget_period.as_deref())
}

fn set_budget(micro_usd: i64) -> Option<BudgetUpdate> {
    Some(BudgetUpdate {
        micro_usd: Some(micro_usd),
    })
}

fn remove_budget() -> Option<BudgetUpdate> {
    Some(BudgetUpdate { micro_usd: None })
}

/// Budgets (DESIGN §18): micro-USD per day, week or month (default month), returned by every
/// read, set, changed and removed by updates (each a new config version), bounded, and carried by
/// the snapshot.
async fn virtual_key_budgets(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let create = |name: &str, budget: Option<i64>, period: Option<&str>| CreateVirtualKeyRequest {
        name: name.into(),
        budget_micro_usd: budget,
        budget_period: period.map(Into::into),
        ..Default::default()
    };

    // $100 with no period: monthly. $5 a day. $0 (every request refused) is a budget.
    let monthly = admin
        .create_virtual_key(create("monthly", Some(100_000_000), None))
        .await
        .unwrap()
        .into_inner()
        .virtual_key
        .unwrap();
    assert_eq!(budget_of(&monthly), (Some(100_000_000), Some("month")));
    let daily = admin
        .create_virtual_key(create("daily", Some(5_000_000), Some("day")))
        .await
        .unwrap()
        .into_inner()
        .virtual_key
        .unwrap();
    assert_eq!(budget_of(&daily), (Some(5_000_000), Some("day")));
    let zero = admin
        .create_virtual_key(create("zero", Some(0), Some("week")))
        .await
        .unwrap()
        .into_inner()
        .virtual_key
        .unwrap();
    assert_eq!(budget_of(&zero), (Some(0), Some("week")));
    let plain = add_key(&mut admin, "plain", None)
        .await
        .virtual_key
        .unwrap();
    assert_eq!(budget_of(&plain), (None, None));

    // Reads return what was stored.
    let got = admin
        .get_virtual_key(get("monthly"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&got), (Some(100_000_000), Some("month")));
    let listed = admin
        .list_virtual_keys(ListVirtualKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .virtual_keys;
    let by_name: HashMap<&str, (Option<i64>, Option<&str>)> = listed
        .iter()
        .map(|k| (k.name.as_str(), budget_of(k)))
        .collect();
    assert_eq!(by_name["monthly"], (Some(100_000_000), Some("month")));
    assert_eq!(by_name["daily"], (Some(5_000_000), Some("day")));
    assert_eq!(by_name["zero"], (Some(0), Some("week")));
    assert_eq!(by_name["plain"], (None, None));

    // Refused on create, with the field named; nothing is written.
    let before = version(&cp).await;
    let max = llm_proxy_control_plane::validate::MAX_BUDGET_MICRO_USD;
    for value in [-1, i64::MIN, max + 1, i64::MAX] {
        assert_status(
            admin
                .create_virtual_key(create("bad", Some(value), None))
                .await,
            Code::InvalidArgument,
            "budget_micro_usd",
        );
    }
    let status = admin
        .create_virtual_key(create("bad", Some(1), Some("year")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "budget_period must be day, week or month, got \"year\""
    );
    for bad in ["Month", "", "monthly"] {
        assert_status(
            admin
                .create_virtual_key(create("bad", Some(1), Some(bad)))
                .await,
            Code::InvalidArgument,
            "budget_period",
        );
    }
    let status = admin
        .create_virtual_key(create("bad", None, Some("week")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("budget_period needs a budget"),
        "{status:?}"
    );
    assert_eq!(version(&cp).await, before, "refused creates change nothing");
    // The bound itself is a budget.
    let richest = admin
        .create_virtual_key(create("richest", Some(max), None))
        .await
        .unwrap()
        .into_inner()
        .virtual_key
        .unwrap();
    assert_eq!(budget_of(&richest), (Some(max), Some("month")));

    let update =
        |id: &str, budget: Option<BudgetUpdate>, period: Option<&str>| UpdateVirtualKeyRequest {
            id: id.into(),
            budget,
            budget_period: period.map(Into::into),
            ..Default::default()
        };

    // An update without a budget leaves it alone.
    let renamed = admin
        .update_virtual_key(UpdateVirtualKeyRequest {
            id: daily.id.clone(),
            name: Some("daily-2".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&renamed), (Some(5_000_000), Some("day")));
    // A new amount keeps the period; each change is a new config version.
    let v = version(&cp).await;
    let raised = admin
        .update_virtual_key(update(&daily.id, set_budget(7_500_000), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&raised), (Some(7_500_000), Some("day")));
    assert_eq!(version(&cp).await, v + 1);
    // A new period alone keeps the amount.
    let weekly = admin
        .update_virtual_key(update(&daily.id, None, Some("week")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&weekly), (Some(7_500_000), Some("week")));
    assert_eq!(version(&cp).await, v + 2);
    // Both at once.
    let both = admin
        .update_virtual_key(update(&daily.id, set_budget(1_000_000), Some("month")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&both), (Some(1_000_000), Some("month")));
    // Removing the budget removes its period.
    let removed = admin
        .update_virtual_key(update(&daily.id, remove_budget(), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&removed), (None, None));
    assert_eq!(version(&cp).await, v + 4);
    // A key without a budget gets one: monthly unless a period comes with it.
    let fresh = admin
        .update_virtual_key(update(&plain.id, set_budget(20_000_000), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&fresh), (Some(20_000_000), Some("month")));
    let fresh_daily = admin
        .update_virtual_key(update(&daily.id, set_budget(3_000_000), Some("day")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&fresh_daily), (Some(3_000_000), Some("day")));
    let v = version(&cp).await;

    // Refused updates: the field named, nothing changed.
    let status = admin
        .update_virtual_key(update(&plain.id, set_budget(max + 1), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "budget_micro_usd must be at most 1000000000000000 micro-USD ($1000000000), got 1000000000000001"
    );
    assert_status(
        admin
            .update_virtual_key(update(&plain.id, set_budget(-1), None))
            .await,
        Code::InvalidArgument,
        "budget_micro_usd",
    );
    assert_status(
        admin
            .update_virtual_key(update(&plain.id, None, Some("fortnight")))
            .await,
        Code::InvalidArgument,
        "budget_period",
    );
    // A period for a key without a budget, or with the budget being removed.
    let other = add_key(&mut admin, "other", None)
        .await
        .virtual_key
        .unwrap();
    let v = v + 1;
    let status = admin
        .update_virtual_key(update(&other.id, None, Some("day")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("budget_period needs a budget"),
        "{status:?}"
    );
    assert_status(
        admin
            .update_virtual_key(update(&plain.id, remove_budget(), Some("day")))
            .await,
        Code::InvalidArgument,
        "budget_period",
    );
    assert_eq!(version(&cp).await, v, "refused updates change nothing");
    let unchanged = admin
        .get_virtual_key(get(&plain.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&unchanged), (Some(20_000_000), Some("month")));
    let unchanged = admin
        .get_virtual_key(get(&other.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(budget_of(&unchanged), (None, None));

    // The snapshot carries the budgets to the data planes; "" is the period of no budget.
    let built = llm_proxy_control_plane::hub::build_snapshot(&cp.store, 0)
        .await
        .unwrap();
    let in_snapshot: HashMap<String, (Option<i64>, String)> = built
        .snapshot
        .virtual_keys
        .into_iter()
        .map(|k| (k.name, (k.budget_micro_usd, k.budget_period)))
        .collect();
    assert_eq!(in_snapshot["monthly"], (Some(100_000_000), "month".into()));
    assert_eq!(in_snapshot["daily-2"], (Some(3_000_000), "day".into()));
    assert_eq!(in_snapshot["zero"], (Some(0), "week".into()));
    assert_eq!(in_snapshot["plain"], (Some(20_000_000), "month".into()));
    assert_eq!(in_snapshot["richest"], (Some(max), "month".into()));
    assert_eq!(in_snapshot["other"], (None, String::new()));
    cp.shutdown().await;
}

async fn virtual_keys_crud(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;

    let generated = add_key(&mut admin, "Backend", None).await;
    let key = generated
        .generated_key
        .clone()
        .expect("generated key is returned once");
    assert!(key.starts_with("vk-") && key.len() >= 35, "{key}");
    let vk = generated.virtual_key.unwrap();
    assert!(vk.id.starts_with("vkey-"));
    assert!(vk.enabled);
    assert!(vk.key_hint.starts_with("vk-") && vk.key_hint.contains('…'));
    assert!(
        !vk.key_hint.contains(&key[6..key.len() - 4]),
        "hint hides the middle"
    );

    let chosen = add_key(&mut admin, "Frontend-App", Some("vk-front-1234")).await;
    assert_eq!(
        chosen.generated_key, None,
        "a user-chosen key is not echoed"
    );
    let front = chosen.virtual_key.unwrap();
    assert_eq!(front.key_hint, "vk-fr…1234");

    let dup = admin
        .create_virtual_key(CreateVirtualKeyRequest {
            name: "Other".into(),
            key: Some("vk-front-1234".into()),
            expires_at: None,
            ..Default::default()
        })
        .await;
    let status = dup.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(!status.message().contains("vk-front-1234"));

    let got = admin
        .get_virtual_key(get("Frontend-App"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, front.id);

    let expiry = Timestamp {
        seconds: 4_102_444_800,
        nanos: 0,
    };
    let disabled = admin
        .update_virtual_key(UpdateVirtualKeyRequest {
            id: front.id.clone(),
            name: Some("Frontend".into()),
            enabled: Some(false),
            expires_at: Some(expiry),
            clear_expires_at: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!disabled.enabled);
    assert_eq!(disabled.name, "Frontend");
    assert_eq!(disabled.expires_at, Some(expiry));
    let cleared = admin
        .update_virtual_key(UpdateVirtualKeyRequest {
            id: "Frontend".into(),
            enabled: Some(true),
            clear_expires_at: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.enabled);
    assert_eq!(cleared.expires_at, None);

    let list = admin
        .list_virtual_keys(ListVirtualKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.virtual_keys.len(), 2);

    // Deleting a key deletes its assignments.
    add_connection(
        &mut admin,
        "OpenAI",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    add_model(&mut admin, "OpenAI", "gpt-4", None).await;
    let asg = admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: "Frontend".into(),
            model_id: "gpt-4".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .delete_virtual_key(delete("Frontend", false))
        .await
        .unwrap();
    assert_status(
        admin.get_assignment(get(&asg.id)).await,
        Code::NotFound,
        &asg.id,
    );
    assert_status(
        admin.get_virtual_key(get(&front.id)).await,
        Code::NotFound,
        &front.id,
    );
    cp.shutdown().await;
}

async fn assignments_crud(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    add_connection(
        &mut admin,
        "OpenAI-Main",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    let model = add_model(&mut admin, "OpenAI-Main", "gpt-4-turbo", None).await;
    let key = add_key(&mut admin, "Frontend-App", Some("vk-front-1234"))
        .await
        .virtual_key
        .unwrap();

    let asg = admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: "Frontend-App".into(),
            model_id: "OpenAI-Main/gpt-4-turbo".into(),
            alias: Some("gpt-4".into()),
            tps: Some(50),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(asg.id.starts_with("asg-"));
    assert_eq!(
        (asg.vkey_id.as_str(), asg.model_id.as_str()),
        (key.id.as_str(), model.id.as_str())
    );
    assert_eq!(
        (asg.tps, asg.burst, asg.tpm, asg.weight),
        (Some(50), None, None, 1)
    );

    let default_alias = admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: key.id.clone(),
            model_id: model.id.clone(),
            tpm: Some(100_000),
            weight: Some(3),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        default_alias.alias, "gpt-4-turbo",
        "alias defaults to the model name"
    );

    let duplicate = admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: key.id.clone(),
            model_id: model.id.clone(),
            alias: Some("gpt-4".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(duplicate.unwrap_err().code(), Code::AlreadyExists);

    let list = admin
        .list_assignments(ListAssignmentsRequest {
            vkey_id: "Frontend-App".into(),
            model_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .assignments;
    assert_eq!(list.len(), 2);

    let updated = admin
        .update_assignment(UpdateAssignmentRequest {
            id: asg.id.clone(),
            alias: Some("gpt-4-fast".into()),
            tps: Some(10),
            burst: Some(20),
            tpm: Some(5000),
            weight: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            updated.alias.as_str(),
            updated.tps,
            updated.burst,
            updated.tpm,
            updated.weight
        ),
        ("gpt-4-fast", Some(10), Some(20), Some(5000), 2)
    );
    let cleared = admin
        .update_assignment(UpdateAssignmentRequest {
            id: asg.id.clone(),
            clear_tpm: true,
            clear_burst: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cleared.tps, cleared.burst, cleared.tpm),
        (Some(10), None, None)
    );

    let got = admin
        .get_assignment(get(&asg.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, cleared);
    admin
        .delete_assignment(delete(&asg.id, false))
        .await
        .unwrap();
    assert_status(
        admin.get_assignment(get(&asg.id)).await,
        Code::NotFound,
        &asg.id,
    );
    cp.shutdown().await;
}

async fn deleting_referenced_rows_needs_force(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    add_connection(
        &mut admin,
        "OpenAI",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    let m1 = add_model(&mut admin, "OpenAI", "gpt-4", None).await;
    let m2 = add_model(&mut admin, "OpenAI", "gpt-4o", None).await;
    add_key(&mut admin, "App", Some("vk-app-123456")).await;
    let asg = admin
        .create_assignment(CreateAssignmentRequest {
            vkey_id: "App".into(),
            model_id: m1.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let before = version(&cp).await;
    let refused = admin
        .delete_connection(delete("OpenAI", false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("--force"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("gpt-4o"),
        "{}",
        refused.message()
    );
    let refused = admin
        .delete_provider_model(delete(&m1.id, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains(&asg.id), "{}", refused.message());
    assert_eq!(version(&cp).await, before, "refused deletes change nothing");

    admin
        .delete_provider_model(delete(&m2.id, false))
        .await
        .unwrap();
    admin
        .delete_connection(delete("OpenAI", true))
        .await
        .unwrap();
    assert_eq!(
        admin
            .get_provider_model(get(&m1.id))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        admin.get_assignment(get(&asg.id)).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(version(&cp).await, before + 2);
    cp.shutdown().await;
}

async fn bad_input_is_rejected_with_the_field_named(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    let conn = |name: &str, provider: &str, endpoint: &str, opts: &[(&str, &str)]| {
        CreateConnectionRequest {
            name: name.into(),
            provider: provider.into(),
            endpoint: endpoint.into(),
            credential: "sk-abc".into(),
            options: options(opts),
        }
    };
    let cases = [
        (
            conn("A", "cohere", "https://x.com", &[]),
            Code::InvalidArgument,
            "provider",
        ),
        (
            conn("A", "openai", "api.openai.com", &[]),
            Code::InvalidArgument,
            "endpoint",
        ),
        (
            conn("A", "openai", "ftp://api.openai.com", &[]),
            Code::InvalidArgument,
            "endpoint",
        ),
        (
            conn(" ", "openai", "https://x.com", &[]),
            Code::InvalidArgument,
            "name",
        ),
        (
            conn("A", "azure", "https://x.com", &[("api_version", "soon")]),
            Code::InvalidArgument,
            "api_version",
        ),
        (
            conn("A", "openai", "https://x.com", &[("timeout_s", "-1")]),
            Code::InvalidArgument,
            "timeout_s",
        ),
        (
            conn("A", "google", "https://x.com", &[("api", "palm")]),
            Code::InvalidArgument,
            "api",
        ),
        (
            conn(
                "A",
                "anthropic",
                "https://api.anthropic.com",
                &[("anthropic_version", "latest")],
            ),
            Code::InvalidArgument,
            "anthropic_version",
        ),
        (
            conn(
                "A",
                "bedrock",
                "https://bedrock-runtime.us-east-1.amazonaws.com",
                &[("anthropic_api", "converse")],
            ),
            Code::InvalidArgument,
            "anthropic_api",
        ),
    ];
    for (request, code, field) in cases {
        assert_status(admin.create_connection(request).await, code, field);
    }
    add_connection(
        &mut admin,
        "OpenAI",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    add_connection(
        &mut admin,
        "Claude",
        "anthropic",
        "https://my-res.services.ai.azure.com/anthropic",
        &[("anthropic_version", "2023-06-01")],
    )
    .await;
    assert_status(
        admin
            .create_connection(conn("OpenAI", "openai", "https://x.com", &[]))
            .await,
        Code::AlreadyExists,
        "OpenAI",
    );

    let model = |conn: &str, name: &str, remote: &str| CreateProviderModelRequest {
        connection_id: conn.into(),
        name: name.into(),
        remote: remote.into(),
        deployment: None,
        ..Default::default()
    };
    assert_status(
        admin.create_provider_model(model("nope", "m", "r")).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        admin.create_provider_model(model("", "m", "r")).await,
        Code::InvalidArgument,
        "connection_id",
    );
    assert_status(
        admin.create_provider_model(model("OpenAI", "", "r")).await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        admin.create_provider_model(model("OpenAI", "m", " ")).await,
        Code::InvalidArgument,
        "remote",
    );
    add_model(&mut admin, "OpenAI", "gpt-4", None).await;
    assert_status(
        admin
            .create_provider_model(model("OpenAI", "gpt-4", "r"))
            .await,
        Code::AlreadyExists,
        "gpt-4",
    );

    assert_status(
        admin
            .create_virtual_key(CreateVirtualKeyRequest {
                name: "".into(),
                key: None,
                expires_at: None,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        admin
            .create_virtual_key(CreateVirtualKeyRequest {
                name: "k".into(),
                key: Some("short".into()),
                expires_at: None,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "key",
    );
    add_key(&mut admin, "App", Some("vk-app-123456")).await;
    assert_status(
        admin
            .create_virtual_key(CreateVirtualKeyRequest {
                name: "App".into(),
                key: None,
                expires_at: None,
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
        "App",
    );

    let assign =
        |vkey: &str, model: &str, tps: Option<i64>, burst: Option<i64>, tpm: Option<i64>| {
            CreateAssignmentRequest {
                vkey_id: vkey.into(),
                model_id: model.into(),
                tps,
                burst,
                tpm,
                ..Default::default()
            }
        };
    let cases = [
        (
            assign("App", "gpt-4", Some(0), None, None),
            Code::InvalidArgument,
            "tps",
        ),
        (
            assign("App", "gpt-4", Some(-3), None, None),
            Code::InvalidArgument,
            "tps",
        ),
        (
            assign("App", "gpt-4", Some(5), Some(0), None),
            Code::InvalidArgument,
            "burst",
        ),
        (
            assign("App", "gpt-4", None, Some(5), None),
            Code::InvalidArgument,
            "burst",
        ),
        (
            assign("App", "gpt-4", None, None, Some(0)),
            Code::InvalidArgument,
            "tpm",
        ),
        (
            assign("nokey", "gpt-4", None, None, None),
            Code::NotFound,
            "nokey",
        ),
        (
            assign("App", "nomodel", None, None, None),
            Code::NotFound,
            "nomodel",
        ),
        (
            assign("", "gpt-4", None, None, None),
            Code::InvalidArgument,
            "vkey_id",
        ),
        (
            assign("App", "", None, None, None),
            Code::InvalidArgument,
            "model_id",
        ),
    ];
    for (request, code, field) in cases {
        assert_status(admin.create_assignment(request).await, code, field);
    }
    let asg = admin
        .create_assignment(assign("App", "gpt-4", Some(5), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        admin
            .update_assignment(UpdateAssignmentRequest {
                id: asg.id.clone(),
                weight: Some(0),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "weight",
    );
    assert_status(
        admin
            .update_assignment(UpdateAssignmentRequest {
                id: asg.id.clone(),
                clear_tps: true,
                burst: Some(3),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "burst",
    );
    assert_status(
        admin
            .update_connection(UpdateConnectionRequest {
                id: "OpenAI".into(),
                endpoint: Some("not a url".into()),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "endpoint",
    );
    assert_status(
        admin
            .update_connection(UpdateConnectionRequest {
                id: "OpenAI".into(),
                set_options: options(&[("region", "us-east-1")]),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "region",
    );
    cp.shutdown().await;
}

/// The stored credential of the connection named `name`, as the data planes would get it.
async fn snapshot_connection(
    cp: &llm_proxy_control_plane::server::RunningControlPlane,
    name: &str,
) -> SnapshotConnection {
    let built = llm_proxy_control_plane::hub::build_snapshot(&cp.store, 0)
        .await
        .unwrap();
    built
        .snapshot
        .connections
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
}

async fn changing_the_endpoint_needs_the_credential(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let cp = common::start(&db).await;
    let mut admin = common::admin(&cp, None).await;
    add_connection(
        &mut admin,
        "OpenAI",
        "openai",
        "https://api.openai.com",
        &[],
    )
    .await;
    let before = version(&cp).await;

    // A new host without the credential: refused, nothing written.
    let status = admin
        .update_connection(UpdateConnectionRequest {
            id: "OpenAI".into(),
            endpoint: Some("https://collector.example.net".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(
        message.starts_with("credential must be given again"),
        "{message}"
    );
    assert!(
        message.contains("endpoint") && message.contains("--api-key"),
        "{message}"
    );
    assert!(!message.contains("secret-of-OpenAI"), "{message}");
    assert_eq!(version(&cp).await, before);
    let stored = snapshot_connection(&cp, "OpenAI").await;
    assert_eq!(
        (stored.endpoint.as_str(), stored.credential.as_str()),
        ("https://api.openai.com", "secret-of-OpenAI")
    );

    // The same endpoint (as normalised) is not a change: other fields update without it.
    admin
        .update_connection(UpdateConnectionRequest {
            id: "OpenAI".into(),
            endpoint: Some("https://api.openai.com/".into()),
            set_options: options(&[("timeout_s", "30")]),
            ..Default::default()
        })
        .await
        .unwrap();

    // A new host with a new credential: both change together.
    let updated = admin
        .update_connection(UpdateConnectionRequest {
            id: "OpenAI".into(),
            endpoint: Some("https://gateway.example.net".into()),
            credential: Some("sk-for-the-new-host".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.endpoint, "https://gateway.example.net");
    let stored = snapshot_connection(&cp, "OpenAI").await;
    assert_eq!(
        (stored.endpoint.as_str(), stored.credential.as_str()),
        ("https://gateway.example.net", "sk-for-the-new-host")
    );
    cp.shutdown().await;
}

async fn calls_without_the_right_token_are_unauthenticated(backend: Backend) {
    let db = common::fresh_db(backend).await;
    let mut settings = common::settings(&db, &common::new_master_key());
    settings.admin_token = Some("admin-token-1".to_owned().into());
    settings.dataplane_token = Some("dp-token-1".to_owned().into());
    let cp = llm_proxy_control_plane::server::start(settings)
        .await
        .unwrap();

    for token in [None, Some("wrong"), Some("dp-token-1")] {
        let mut admin = common::admin(&cp, token).await;
        let status = admin
            .list_connections(ListConnectionsRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "admin with {token:?}");
        assert!(!status.message().contains("admin-token-1"));
    }
    let mut admin = common::admin(&cp, Some("admin-token-1")).await;
    admin
        .list_connections(ListConnectionsRequest {})
        .await
        .unwrap();

    for token in [None, Some("admin-token-1")] {
        let mut config = common::config_client(cp.grpc_addr, token).await;
        let status = config
            .subscribe(SubscribeRequest {
                node_id: "dp-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "config with {token:?}"
        );
    }
    let mut config = common::config_client(cp.grpc_addr, Some("dp-token-1")).await;
    config
        .report_status(ReportStatusRequest {
            node_id: "dp-1".into(),
            applied_version: 1,
            error: String::new(),
        })
        .await
        .unwrap();
    cp.shutdown().await;
}

macro_rules! on_both_backends {
    ($($suite:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $suite() {
                    super::$suite(super::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $suite() {
                    super::$suite(super::Backend::Sqlite).await;
                }
            )*
        }
    };
}

on_both_backends!(
    connections_crud,
    models_crud,
    model_prices,
    virtual_key_budgets,
    virtual_keys_crud,
    assignments_crud,
    deleting_referenced_rows_needs_force,
    bad_input_is_rejected_with_the_field_named,
    changing_the_endpoint_needs_the_credential,
    calls_without_the_right_token_are_unauthenticated,
);
