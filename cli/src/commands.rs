//! The admin commands: each turns its parsed flags into one `AdminService` call and renders the
//! answer (see `render`).

use std::collections::HashMap;
use std::io::{ErrorKind, Write as _};
use std::path::Path;

use anyhow::{Context as _, bail};
use llm_proxy_proto::v1::{
    BudgetUpdate, CreateAssignmentRequest, CreateConnectionRequest, CreateProviderModelRequest,
    CreateVirtualKeyRequest, DeleteRequest, GetRequest, ListAssignmentsRequest,
    ListConnectionsRequest, ListDataPlanesRequest, ListProviderModelsRequest,
    ListVirtualKeysRequest, PriceUpdate, QueryUsageRequest, UpdateAssignmentRequest,
    UpdateConnectionRequest, UpdateProviderModelRequest, UpdateVirtualKeyRequest,
};

use crate::args::{
    AssignmentAddArgs, AssignmentCommand, AssignmentListArgs, AssignmentUpdateArgs, Command,
    ConnectionAddArgs, ConnectionCommand, ConnectionUpdateArgs, CredentialArgs, ForceDeleteArgs,
    IdArg, ModelAddArgs, ModelCommand, ModelListArgs, ModelUpdateArgs, OutputFormat, UsageArgs,
    VkeyAddArgs, VkeyCommand, VkeyUpdateArgs,
};
use crate::client::Admin;
use crate::price::UsdArg;
use crate::render;
use crate::usage;

/// Runs an admin command (everything but `serve`) against the control plane and prints the result.
pub async fn run(admin: &mut Admin, format: OutputFormat, command: Command) -> anyhow::Result<()> {
    let text = execute(admin, format, command).await?;
    write_stdout(&text)
}

/// Runs an admin command and returns what it prints.
pub async fn execute(
    admin: &mut Admin,
    format: OutputFormat,
    command: Command,
) -> anyhow::Result<String> {
    if format == OutputFormat::Csv && !matches!(command, Command::Usage(_)) {
        bail!("-o csv is available for `llmctl usage` only; use -o table or -o json");
    }
    Ok(match command {
        Command::Connection(cmd) => connection(admin, format, cmd).await?,
        Command::Model(cmd) => model(admin, format, cmd).await?,
        Command::Vkey(cmd) => vkey(admin, format, cmd).await?,
        Command::Assign(args) => assignment_add(admin, format, args).await?,
        Command::Assignment(cmd) => assignment(admin, format, cmd).await?,
        Command::Unassign(IdArg { id }) => assignment_delete(admin, format, id).await?,
        Command::Dataplanes => {
            let response = admin
                .client
                .list_data_planes(ListDataPlanesRequest {})
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::list(format, &response.data_planes)
        }
        Command::Usage(args) => usage_report(admin, format, args).await?,
        Command::Serve(_) => bail!("`serve` is not an admin command"),
    })
}

async fn usage_report(
    admin: &mut Admin,
    format: OutputFormat,
    args: UsageArgs,
) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let groups = usage::canonical(&args.group_by);
    let request = QueryUsageRequest {
        vkey: args.vkey,
        model: args.model,
        alias: args.alias,
        since: args.since.map(|t| t.resolve(now)),
        until: args.until.map(|t| t.resolve(now)),
        group_by: groups.iter().map(|g| g.proto() as i32).collect(),
    };
    let response = admin
        .client
        .query_usage(request)
        .await
        .map_err(|s| admin.error(s))?
        .into_inner();
    usage::render(format, &groups, &response.rows).map_err(anyhow::Error::msg)
}

async fn connection(
    admin: &mut Admin,
    format: OutputFormat,
    cmd: ConnectionCommand,
) -> anyhow::Result<String> {
    Ok(match cmd {
        ConnectionCommand::Add(args) => {
            let ConnectionAddArgs {
                name,
                provider,
                endpoint,
                credential,
                set,
                control_plane: _,
            } = args;
            let request = CreateConnectionRequest {
                name,
                provider: provider.as_str().to_owned(),
                endpoint,
                credential: read_credential(credential).await?.unwrap_or_default(),
                options: set.into_iter().collect(),
            };
            let created = admin
                .client
                .create_connection(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::created(format, &created)
        }
        ConnectionCommand::List => {
            let response = admin
                .client
                .list_connections(ListConnectionsRequest {})
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::list(format, &response.connections)
        }
        ConnectionCommand::Get(IdArg { id }) => {
            let found = admin
                .client
                .get_connection(GetRequest { id })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &found)
        }
        ConnectionCommand::Update(args) => {
            let ConnectionUpdateArgs {
                id,
                name,
                endpoint,
                credential,
                set,
                unset,
                control_plane: _,
            } = args;
            let set_options: HashMap<String, String> = set.into_iter().collect();
            if let Some(key) = unset.iter().find(|k| set_options.contains_key(*k)) {
                bail!("option `{key}` is given to both --set and --unset");
            }
            if endpoint.is_some()
                && credential.api_key.is_none()
                && credential.api_key_file.is_none()
            {
                // The control plane refuses it too; saying so here names the flags to add.
                bail!(
                    "--endpoint needs the credential again: add --api-key or --api-key-file (a stored credential is never sent to a new endpoint)"
                );
            }
            let request = UpdateConnectionRequest {
                id,
                name,
                endpoint,
                credential: read_credential(credential).await?,
                set_options,
                unset_options: unset,
            };
            let updated = admin
                .client
                .update_connection(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &updated)
        }
        ConnectionCommand::Delete(ForceDeleteArgs { id, force }) => {
            let response = admin
                .client
                .delete_connection(DeleteRequest {
                    id: id.clone(),
                    force,
                })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::deleted(format, &deleted_id(response.id, id))
        }
    })
}

async fn model(
    admin: &mut Admin,
    format: OutputFormat,
    cmd: ModelCommand,
) -> anyhow::Result<String> {
    Ok(match cmd {
        ModelCommand::Add(ModelAddArgs {
            conn_id,
            name,
            remote,
            deployment,
            prices,
        }) => {
            // `none` on add is the same as leaving the flag out: no price.
            let price = |arg: Option<UsdArg>| arg.and_then(UsdArg::micro_usd);
            let request = CreateProviderModelRequest {
                connection_id: conn_id,
                name,
                remote,
                deployment,
                price_input: price(prices.price_input),
                price_output: price(prices.price_output),
                price_cache_read: price(prices.price_cache_read),
                price_cache_write: price(prices.price_cache_write),
            };
            let created = admin
                .client
                .create_provider_model(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::created(format, &created)
        }
        ModelCommand::List(ModelListArgs { conn_id }) => {
            let request = ListProviderModelsRequest {
                connection_id: conn_id.unwrap_or_default(),
            };
            let response = admin
                .client
                .list_provider_models(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::list(format, &response.models)
        }
        ModelCommand::Get(IdArg { id }) => {
            let found = admin
                .client
                .get_provider_model(GetRequest { id })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &found)
        }
        ModelCommand::Update(ModelUpdateArgs {
            id,
            name,
            remote,
            deployment,
            prices,
        }) => {
            let request = UpdateProviderModelRequest {
                id,
                name,
                remote,
                deployment,
                price_input: price_update(prices.price_input),
                price_output: price_update(prices.price_output),
                price_cache_read: price_update(prices.price_cache_read),
                price_cache_write: price_update(prices.price_cache_write),
            };
            let updated = admin
                .client
                .update_provider_model(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &updated)
        }
        ModelCommand::Delete(ForceDeleteArgs { id, force }) => {
            let response = admin
                .client
                .delete_provider_model(DeleteRequest {
                    id: id.clone(),
                    force,
                })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::deleted(format, &deleted_id(response.id, id))
        }
    })
}

/// A `--price-*` flag of `model update`: absent leaves the price alone, `none` removes it.
fn price_update(arg: Option<UsdArg>) -> Option<PriceUpdate> {
    arg.map(|arg| PriceUpdate {
        micro_usd_per_million: arg.micro_usd(),
    })
}

async fn vkey(admin: &mut Admin, format: OutputFormat, cmd: VkeyCommand) -> anyhow::Result<String> {
    Ok(match cmd {
        VkeyCommand::Add(VkeyAddArgs {
            name,
            key,
            expires_at,
            budget,
        }) => {
            let request = CreateVirtualKeyRequest {
                name,
                key,
                expires_at,
                // `none` on add is the same as leaving the flag out: no budget.
                budget_micro_usd: budget.budget_usd.and_then(UsdArg::micro_usd),
                budget_period: budget.budget_period.map(|p| p.as_str().to_owned()),
            };
            let response = admin
                .client
                .create_virtual_key(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::created_vkey(format, &response)
        }
        VkeyCommand::List => {
            let response = admin
                .client
                .list_virtual_keys(ListVirtualKeysRequest {})
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::list(format, &response.virtual_keys)
        }
        VkeyCommand::Get(IdArg { id }) => {
            let found = admin
                .client
                .get_virtual_key(GetRequest { id })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &found)
        }
        VkeyCommand::Update(VkeyUpdateArgs {
            id,
            name,
            disable,
            enable,
            expires_at,
            no_expiry,
            budget,
        }) => {
            let enabled = match (enable, disable) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let request = UpdateVirtualKeyRequest {
                id,
                name,
                enabled,
                expires_at,
                clear_expires_at: no_expiry,
                // Absent leaves the budget alone, `none` removes it.
                budget: budget.budget_usd.map(|arg| BudgetUpdate {
                    micro_usd: arg.micro_usd(),
                }),
                budget_period: budget.budget_period.map(|p| p.as_str().to_owned()),
            };
            let updated = admin
                .client
                .update_virtual_key(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &updated)
        }
        VkeyCommand::Delete(IdArg { id }) => {
            let response = admin
                .client
                .delete_virtual_key(DeleteRequest {
                    id: id.clone(),
                    force: false,
                })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::deleted(format, &deleted_id(response.id, id))
        }
    })
}

async fn assignment(
    admin: &mut Admin,
    format: OutputFormat,
    cmd: AssignmentCommand,
) -> anyhow::Result<String> {
    Ok(match cmd {
        AssignmentCommand::Add(args) => assignment_add(admin, format, args).await?,
        AssignmentCommand::List(AssignmentListArgs { vkey_id, model_id }) => {
            let request = ListAssignmentsRequest {
                vkey_id: vkey_id.unwrap_or_default(),
                model_id: model_id.unwrap_or_default(),
            };
            let response = admin
                .client
                .list_assignments(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::list(format, &response.assignments)
        }
        AssignmentCommand::Get(IdArg { id }) => {
            let found = admin
                .client
                .get_assignment(GetRequest { id })
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &found)
        }
        AssignmentCommand::Update(AssignmentUpdateArgs {
            id,
            alias,
            tps,
            burst,
            tpm,
            weight,
            no_tps,
            no_burst,
            no_tpm,
        }) => {
            let request = UpdateAssignmentRequest {
                id,
                alias,
                tps,
                burst,
                tpm,
                weight,
                clear_tps: no_tps,
                clear_burst: no_burst,
                clear_tpm: no_tpm,
            };
            let updated = admin
                .client
                .update_assignment(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner();
            render::one(format, &updated)
        }
        AssignmentCommand::Delete(IdArg { id }) => assignment_delete(admin, format, id).await?,
    })
}

async fn assignment_add(
    admin: &mut Admin,
    format: OutputFormat,
    args: AssignmentAddArgs,
) -> anyhow::Result<String> {
    let AssignmentAddArgs {
        vkey_id,
        model_id,
        alias,
        tps,
        burst,
        tpm,
        weight,
    } = args;
    let request = CreateAssignmentRequest {
        vkey_id,
        model_id,
        alias,
        tps,
        burst,
        tpm,
        weight,
    };
    let created = admin
        .client
        .create_assignment(request)
        .await
        .map_err(|s| admin.error(s))?
        .into_inner();
    Ok(render::created(format, &created))
}

async fn assignment_delete(
    admin: &mut Admin,
    format: OutputFormat,
    id: String,
) -> anyhow::Result<String> {
    let response = admin
        .client
        .delete_assignment(DeleteRequest {
            id: id.clone(),
            force: false,
        })
        .await
        .map_err(|s| admin.error(s))?
        .into_inner();
    Ok(render::deleted(format, &deleted_id(response.id, id)))
}

/// The ID the server reports as deleted (the given name resolved), else what the user gave.
fn deleted_id(reported: String, given: String) -> String {
    if reported.is_empty() { given } else { reported }
}

/// The credential of `--api-key` or the content of `--api-key-file` (trailing newlines trimmed).
async fn read_credential(args: CredentialArgs) -> anyhow::Result<Option<String>> {
    match (args.api_key, args.api_key_file) {
        (Some(key), _) => Ok(Some(key)),
        (None, Some(path)) => read_credential_file(&path).await.map(Some),
        (None, None) => Ok(None),
    }
}

async fn read_credential_file(path: &Path) -> anyhow::Result<String> {
    let content = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
    let credential = content.trim_end_matches(['\n', '\r']);
    if credential.trim().is_empty() {
        bail!("--api-key-file {} is empty", path.display());
    }
    Ok(credential.to_owned())
}

/// Writes the whole output at once; a closed pipe (`llmctl ... | head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credential_file_is_read_and_trailing_newlines_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-secret\r\n").unwrap();
        let credential = read_credential(CredentialArgs {
            api_key: None,
            api_key_file: Some(path.clone()),
        })
        .await
        .unwrap();
        assert_eq!(credential.as_deref(), Some("sk-secret"));

        std::fs::write(&path, "{\n  \"type\": \"service_account\"\n}\n").unwrap();
        let credential = read_credential_file(&path).await.unwrap();
        assert_eq!(credential, "{\n  \"type\": \"service_account\"\n}");

        std::fs::write(&path, "\n").unwrap();
        let err = read_credential_file(&path).await.unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");

        let err = read_credential_file(&dir.path().join("missing"))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").starts_with("cannot read --api-key-file"),
            "{err:#}"
        );
    }
}
