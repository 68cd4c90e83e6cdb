//! Bootstrap config by directory rename: 8 processes, 50 updates each, on
//! one directory; the final version holds all 400.

use std::process::Command;

use catalog::bootstrap::ConfigDir;

use crate::harness::binary;

#[test]
fn concurrent_processes_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    let processes: Vec<_> = (0..8)
        .map(|process| {
            let settings: Vec<String> = (0..50).map(|update| format!("p{process}.u{update}=done")).collect();
            Command::new(binary())
                .args(["cluster-config", "set", "--each", "--dir"])
                .arg(&config_dir)
                .args(&settings)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut process in processes {
        let status = process.wait().unwrap();
        assert!(status.success(), "a writer failed: {status}");
    }
    let (version, config) = ConfigDir::new(fsio::real(), config_dir).latest().unwrap().unwrap();
    assert_eq!(version, 400, "one version per update");
    assert_eq!(config.settings.len(), 400, "the final version holds every update");
    for process in 0..8 {
        for update in 0..50 {
            assert_eq!(config.settings.get(&format!("p{process}.u{update}")).map(String::as_str), Some("done"));
        }
    }
}
