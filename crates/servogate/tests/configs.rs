//! Every file shipped in configs/ is a valid config.

use std::path::Path;

#[test]
fn every_file_in_configs_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = servogate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!cfg.devices.is_empty(), "{}: no devices", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 2, "demo.toml and example.toml at least");
}

#[test]
fn the_demo_config_has_six_axes_on_one_bus() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/demo.toml");
    let cfg = servogate::config::load(&path).unwrap();
    assert_eq!(cfg.buses.len(), 1);
    assert_eq!(cfg.devices.len(), 6);
    assert!(cfg.devices.iter().all(|d| d.poll.as_millis() == 10));
}
