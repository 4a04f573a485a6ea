//! Admitting a request: its key, its route, its adapter version, its place in the engine.

use std::sync::Arc;

use openlora_sdk::RequestInfo;
use serde_json::Value;

use super::context::{Context, SettleError, blocking};
use super::metered::Metered;
use super::record::{Recorder, billing_json};
use crate::engine::EngineHandle;
use crate::ledger::{Artifact, KeyGuard, KeyState, Ledger, now_ms};
use crate::policy::PolicyHost;
use crate::request::Prepared;

/// A request ready to be admitted: validated, with its tenant and its client's key.
pub struct Admission {
    /// The validated request, before routing.
    pub prepared: Prepared,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The model name the client asked for.
    pub requested_model: String,
    /// The client's `Idempotency-Key`, checked.
    pub idempotency_key: Option<String>,
}

/// Admits requests and settles them: owns the policy host, the ledger and the identities of
/// the base model and the adapters.
pub struct SettlementService {
    engine: EngineHandle,
    recorder: Arc<Recorder>,
}

impl SettlementService {
    /// The service for `engine`'s model, served as `model_name`, billing in `currency`.
    pub fn new(
        engine: EngineHandle,
        policy: Arc<PolicyHost>,
        ledger: Arc<Ledger>,
        model_name: String,
        currency: String,
    ) -> Arc<Self> {
        let base = Artifact { name: model_name, sha256: engine.model().sha256.clone() };
        let recorder = Arc::new(Recorder { policy, ledger, base, currency });
        Arc::new(SettlementService { engine, recorder })
    }

    /// The policy host.
    pub fn policy(&self) -> &Arc<PolicyHost> {
        &self.recorder.policy
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.recorder.ledger
    }

    /// Claims the request's ledger key: the client's idempotency key (scoped to its tenant),
    /// refused while a request with it runs or once it has an entry; else the request id.
    async fn reserve(
        self: &Arc<Self>,
        tenant: &str,
        given: Option<String>,
        request_id: &str,
    ) -> Result<(String, Option<Arc<KeyGuard>>), SettleError> {
        let Some(given) = given else { return Ok((format!("req:{request_id}"), None)) };
        let key = format!("idem:{tenant}:{given}");
        let (ledger, k) = (self.recorder.ledger.clone(), key.clone());
        match blocking("idempotency check", move || Ok(ledger.reserve(&k)?)).await? {
            KeyState::Free(guard) => Ok((key, Some(Arc::new(guard)))),
            KeyState::InFlight => Err(SettleError::KeyInUse),
            KeyState::Done(entry) => {
                let billing = entry.parse().map(|b| billing_json(&b, &entry)).unwrap_or(Value::Null);
                Err(SettleError::KeyReused { billing: Box::new(billing) })
            }
        }
    }

    /// Admits a request: claims its key, routes it, resolves its adapter to the version
    /// registered now (which it runs with and is recorded with), and queues it in the engine.
    /// The returned stream always ends in the ledger.
    pub async fn admit(self: &Arc<Self>, a: Admission) -> Result<Metered, SettleError> {
        let Admission { prepared, tenant, requested_model, idempotency_key } = a;
        let Prepared { mut checked, requested_adapter, metadata, max_tokens } = prepared;
        let request = checked.request();
        let (key, guard) = self.reserve(&tenant, idempotency_key, &request.id).await?;
        // The requested adapter, resolved once: its owner for the plugins, and the version the
        // request runs with if the router keeps it.
        let requested = requested_adapter.as_deref().and_then(|n| self.engine.checker().lookup(n));
        let mut info = RequestInfo {
            request_id: request.id.clone(),
            tenant,
            requested_model,
            adapter_owner: requested.as_ref().and_then(|a| a.manifest.owner.clone()),
            adapter: requested_adapter,
            prompt_tokens: u32::try_from(request.prompt_ids.len()).unwrap_or(u32::MAX),
            max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
            metadata,
            received_at_ms: now_ms(),
        };
        let (svc, asked) = (self.clone(), info.clone());
        let (routed, valid, router_blob) = blocking("routing", move || {
            let pager = svc.engine.pager();
            let exists = |a: &str| requested.as_ref().is_some_and(|r| r.name == a) || pager.manifest(a).is_some();
            let routed = svc.recorder.policy.route(&asked, &exists)?;
            checked.route(routed.adapter.clone(), routed.priority);
            let valid = svc.engine.checker().admit_resolved(checked, requested)?;
            // The router's bytes, kept now if the ledger may not hold them yet: its version
            // may be removed before this request's entry is written.
            let router_blob = routed
                .by
                .plugin
                .strip_prefix("sha256:")
                .filter(|sha| svc.recorder.ledger.needs_blob(sha))
                .and_then(|sha| svc.recorder.policy.blob(sha).map(|b| (sha.to_string(), b)));
            Ok((routed, valid, router_blob))
        })
        .await?;
        let adapter = valid.adapter().map(|a| Artifact { name: a.name.clone(), sha256: a.manifest.sha256.clone() });
        info.adapter_owner = valid.adapter().and_then(|a| a.manifest.owner.clone());
        info.adapter = routed.adapter;
        let ctx = Context { info, routed_by: routed.by, router_blob, adapter, key, _guard: guard };
        let stream = self.engine.enqueue(valid)?;
        Ok(Metered::new(self.recorder.clone(), stream, ctx))
    }
}
