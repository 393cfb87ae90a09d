//! `ganglion init`: a gateway folder outside the repository that loads from
//! any working directory, and a non-empty folder is refused.

use ganglion_tests::*;

#[test]
fn init_scaffolds_a_gateway_folder_that_checks_from_elsewhere_and_refuses_a_non_empty_one() {
    let (plugins, _) = built();
    let scratch = scratch("init");
    let dir = scratch.join("gateway");
    let out = std::process::Command::new(ganglion_binary())
        .current_dir(&scratch)
        .env_remove("GANGLION_CONFIG")
        .args(["init", "gateway", "--plugins"])
        .arg(plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ganglion.toml",
        "README.md",
        "rules/machine-overheat.toml",
        "plugins/clean-readings.wasm",
        "plugins/threshold-alert.wasm",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing: {stdout}");
    }
    // Its paths are relative to the file: loaded from elsewhere, they point
    // into the folder.
    let config = ganglion::config::GanglionConfig::load(&dir.join("ganglion.toml")).unwrap();
    assert_eq!(config.rules.dir, dir.join("rules"));
    assert_eq!(config.plugins.dir, dir.join("plugins"));
    // A copied plugin loads under the limits of the folder's config, run
    // from another working directory.
    let check = std::process::Command::new(ganglion_binary())
        .current_dir(std::env::temp_dir())
        .arg("--config")
        .arg(dir.join("ganglion.toml"))
        .arg("check")
        .arg(dir.join("plugins/clean-readings.wasm"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains(": ok"), "{text}");
    // A second init into the same folder touches nothing.
    let again = std::process::Command::new(ganglion_binary())
        .current_dir(&scratch)
        .args(["init", "gateway"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("not empty"),
        "{stderr}"
    );
}
