//! The `openlora:policy` WIT package parses, and each world imports only `host` and exports
//! its one interface.

use std::path::Path;

use wit_parser::{Resolve, WorldItem, WorldKey};

fn names(resolve: &Resolve, items: &[(&WorldKey, &WorldItem)]) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|(k, item)| match (k, item) {
            (_, WorldItem::Interface { id, .. }) => resolve.interfaces[*id].name.clone().unwrap_or_default(),
            (WorldKey::Name(n), _) => n.clone(),
            (WorldKey::Interface(id), _) => resolve.interfaces[*id].name.clone().unwrap_or_default(),
        })
        .collect();
    v.sort();
    v
}

#[test]
fn policy_package_has_three_worlds_importing_only_host() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/policy.wit");
    let text = std::fs::read_to_string(&path).expect("wit/policy.wit");
    let mut resolve = Resolve::default();
    let pkg = resolve.push_source("policy.wit", &text).expect("wit/policy.wit parses");
    let package = &resolve.packages[pkg];
    assert_eq!(package.name.to_string(), "openlora:policy@0.1.0");
    for (world, export) in [("router", "routing"), ("pricer", "pricing"), ("attributor", "attribution")] {
        let id = package.worlds[world];
        let w = &resolve.worlds[id];
        let imports: Vec<_> = w.imports.iter().collect();
        let exports: Vec<_> = w.exports.iter().collect();
        // `types` comes in as a dependency of `host` and of the exported interface.
        let imported = names(&resolve, &imports);
        assert!(imported.iter().all(|n| n == "host" || n == "types"), "{world} imports {imported:?}");
        assert_eq!(names(&resolve, &exports), vec![export.to_string()], "{world}");
    }
}

/// The SDK carries its own copy of the package, so that a copy of `sdk/` builds anywhere; it
/// must be the server's, byte for byte.
#[test]
fn the_sdks_wit_is_the_servers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let server = std::fs::read(root.join("wit/policy.wit")).expect("wit/policy.wit");
    let sdk = std::fs::read(root.join("sdk/wit/policy.wit")).expect("sdk/wit/policy.wit");
    assert!(server == sdk, "sdk/wit/policy.wit differs from wit/policy.wit: copy wit/policy.wit over it");
}
