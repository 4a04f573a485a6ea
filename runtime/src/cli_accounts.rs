//! `openlora keys create|list|revoke` and `openlora explain`: the operator's commands on the
//! accounts and the ledger, working on the database itself (as `openlora ledger` does).

use anyhow::Context;
use clap::{Args, Subcommand};
use openlora::accounts::{Caller, NewKey};
use openlora::ledger::explain;

use crate::LedgerArgs;

/// `openlora keys ...`.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it (once: only its hash is kept), alone on the last line.
    Create(CreateArgs),
    /// Every key, without secrets.
    List(ListArgs),
    /// Revoke a key by its id: every replica refuses it from the next request on.
    Revoke(RevokeArgs),
}

/// Who a new key is for.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct Whom {
    /// An adapter owner (created with the default quotas if new).
    #[arg(long)]
    owner: Option<String>,
    /// A tenant (inference and its own usage).
    #[arg(long)]
    tenant: Option<String>,
    /// A payee of an owner (read-only earnings; with --of OWNER).
    #[arg(long, requires = "of")]
    contributor: Option<String>,
}

/// `keys create`.
#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    whom: Whom,
    /// The owner whose payee a contributor key reads.
    #[arg(long)]
    of: Option<String>,
    /// Seconds until the key stops working (default: never).
    #[arg(long)]
    expires_in_secs: Option<u64>,
    /// A note kept with the key.
    #[arg(long)]
    label: Option<String>,
    /// Print the record and the key as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ledger: LedgerArgs,
}

/// `keys list`.
#[derive(Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ledger: LedgerArgs,
}

/// `keys revoke`.
#[derive(Args)]
pub struct RevokeArgs {
    /// The key's id (the `<id>` of `olk_<id>_<secret>`, as `keys list` shows it).
    id: String,
    #[command(flatten)]
    ledger: LedgerArgs,
}

/// `openlora explain`.
#[derive(Args)]
pub struct ExplainArgs {
    /// The request's id (a response's `id`, or its `billing.request_id`).
    request_id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ledger: LedgerArgs,
}

/// Runs a `keys` command.
pub fn run_keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create(args) => {
            let w = &args.whom;
            let (scope, account, payee) = match (&w.owner, &w.tenant, &w.contributor) {
                (Some(o), _, _) => ("owner", o.clone(), None),
                (_, Some(t), _) => ("tenant", t.clone(), None),
                (_, _, Some(p)) => ("contributor", args.of.clone().unwrap_or_default(), Some(p.clone())),
                _ => anyhow::bail!("give --owner, --tenant or --contributor"),
            };
            let new = NewKey {
                scope: scope.into(),
                account: Some(account),
                payee,
                label: args.label.clone(),
                expires_in_secs: args.expires_in_secs,
            };
            let (rec, key) = args.ledger.accounts(true)?.create_key(&Caller::Cli, new)?;
            if args.json {
                let mut v = serde_json::json!(rec);
                v["key"] = serde_json::json!(key);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let expiry = rec.expires_at_ms.map_or("never expires".to_string(), |t| format!("expires at {t} ms"));
                println!(
                    "{} key {} for `{}` ({expiry}); it is shown once, keep it:",
                    rec.scope.as_str(),
                    rec.id,
                    rec.account
                );
                println!("{key}");
            }
            Ok(())
        }
        KeysCommand::List(args) => {
            let keys = args.ledger.accounts(false)?.list_keys(&Caller::Cli)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            println!("{:<18} {:<12} {:<24} {:<24} {:<10}", "id", "scope", "account", "payee", "state");
            let now = openlora::ledger::now_ms();
            for k in keys {
                let state = if k.revoked_at_ms.is_some() {
                    "revoked"
                } else if !k.live(now) {
                    "expired"
                } else {
                    "live"
                };
                println!(
                    "{:<18} {:<12} {:<24} {:<24} {:<10}",
                    k.id,
                    k.scope.as_str(),
                    k.account,
                    k.payee.as_deref().unwrap_or("-"),
                    state
                );
            }
            Ok(())
        }
        KeysCommand::Revoke(args) => {
            let rec = args.ledger.accounts(false)?.revoke_key(&Caller::Cli, &args.id)?;
            println!("revoked {} ({} key for `{}`)", rec.id, rec.scope.as_str(), rec.account);
            Ok(())
        }
    }
}

/// Runs `explain`; false when the entry's hash or replay does not hold.
pub fn run_explain(args: ExplainArgs) -> anyhow::Result<bool> {
    let (config, location) = args.ledger.location(false)?;
    let mut db = location.connect().with_context(|| format!("opening the ledger {location}"))?;
    let Some(entry) = explain::find(&mut db, &args.request_id)? else {
        anyhow::bail!("no ledger entry for request `{}`", args.request_id);
    };
    let mut replayer = openlora::policy::Replayer::new(&config.policy)?;
    let mut blobs = |sha: &str| explain::blob(&mut db, sha);
    let e = explain::explain(&entry, &mut replayer, &mut blobs).map_err(|m| anyhow::anyhow!(m))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", explain::text(&e));
    }
    Ok(e.hash_ok && e.replay.ok)
}
