//! The workspace's `rust-version` is true for the locked dependency graph: no package the
//! build resolves (for this platform, with every feature, dev-dependencies included) declares
//! a newer one.

use std::process::Command;

use serde_json::Value;

fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

fn host() -> String {
    let out = Command::new("rustc").arg("-vV").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_the_workspace_declares() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--all-features", "--filter-platform", &host()])
        .args(["--manifest-path", manifest])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let resolved: Vec<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["id"].as_str().unwrap())
        .collect();
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let packages = metadata["packages"].as_array().unwrap();
    let declared = |id: &str| {
        packages
            .iter()
            .find(|p| p["id"] == id)
            .and_then(|p| Some((p["name"].as_str()?, p["rust_version"].as_str()?)))
    };
    let ours: Vec<(&str, &str)> = members.iter().filter_map(|id| declared(id)).collect();
    assert_eq!(
        ours.len(),
        2,
        "both packages declare a rust-version: {ours:?}"
    );
    let minimum = ours.iter().map(|(_, v)| version(v)).min().unwrap();
    let newer: Vec<String> = resolved
        .iter()
        .filter(|id| !members.contains(id))
        .filter_map(|id| declared(id))
        .filter(|(_, v)| version(v) > minimum)
        .map(|(name, v)| format!("{name} needs {v}"))
        .collect();
    assert!(
        newer.is_empty(),
        "the workspace declares rust-version {minimum:?}, but {newer:?}"
    );
    // The check sees the graph: some dependencies do declare one.
    assert!(resolved.iter().filter_map(|id| declared(id)).count() > 10);
}
