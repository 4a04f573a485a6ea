//! A router that misbehaves on purpose, for the sandbox tests; the metadata key `router-mode`
//! picks how. `huge-name` routes to an adapter whose name is 8 MB, `long-name` to one of 200
//! bytes, `sleep` sleeps 30 s and then routes as asked; anything else routes as asked.

use openlora_sdk::{RequestInfo, Route, RouteDecision, Router};

/// The misbehaving router.
pub struct HostileRouter;

impl Router for HostileRouter {
    type Config = ();

    fn route(_config: &(), request: &RequestInfo) -> RouteDecision {
        let adapter = match request.metadata("router-mode") {
            Some("huge-name") => Some("a".repeat(8 << 20)),
            Some("long-name") => Some("b".repeat(200)),
            Some("sleep") => {
                std::thread::sleep(std::time::Duration::from_secs(30));
                request.adapter.clone()
            }
            _ => request.adapter.clone(),
        };
        RouteDecision::Serve(Route { adapter, priority: 0 })
    }
}

openlora_sdk::export_router!(HostileRouter);
