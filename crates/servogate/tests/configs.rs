//! The files shipped in configs/ are valid, and mean what their comments say.

use std::path::{Path, PathBuf};
use std::time::Duration;

use servogate::config::{self, BusKind, DeviceAddress};
use servogate_modbus::plan::{field_registers, ReadPlan};
use servogate_modbus::profile::{DataType, RegisterKind, WordOrder};
use servosim::model;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

fn load(name: &str) -> config::Config {
    config::load(&configs_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_file_in_configs_parses_and_validates() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(configs_dir()).expect("configs/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!cfg.devices.is_empty(), "{}: no devices", path.display());
            assert!(!cfg.summary().is_empty());
            checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    checked.sort();
    assert!(
        checked.contains(&"demo.toml".to_owned()) && checked.contains(&"example.toml".to_owned()),
        "{checked:?}"
    );
}

#[test]
fn the_demo_config_is_six_axes_on_one_pty_bus_polled_every_10ms() {
    let cfg = load("demo.toml");
    assert_eq!(cfg.gateway.id, "demo-cell");
    assert_eq!(cfg.mqtt.topic_prefix, "servogate/demo-cell");
    assert_eq!(cfg.buses.len(), 1);
    let BusKind::Modbus(rtu) = &cfg.buses[0].kind else {
        panic!("not modbus-rtu")
    };
    assert_eq!(rtu.link.to_string(), "/tmp/servogate-demo.pty");
    assert_eq!(rtu.baud, 115_200);
    assert_eq!(
        rtu.t35,
        Some(Duration::ZERO),
        "the demo bus is a pty: no wire time"
    );
    let names: Vec<&str> = cfg.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        ["axis-1", "axis-2", "axis-3", "axis-4", "axis-5", "axis-6"]
    );
    for (i, d) in cfg.devices.iter().enumerate() {
        assert_eq!(d.address, DeviceAddress::Unit(i as u8 + 1));
        assert_eq!(d.profile, "servosim-ax");
        assert_eq!(d.poll, Duration::from_millis(10));
    }
    let rtu_buses = cfg.rtu_buses();
    assert_eq!(rtu_buses.len(), 1);
    assert_eq!(rtu_buses[0].1.len(), 6);
}

#[test]
fn the_demo_profile_decodes_servosims_registers_and_command_registers_in_two_reads() {
    let cfg = load("demo.toml");
    let fields = cfg.fields(&cfg.devices[0]).unwrap();
    let BusKind::Modbus(rtu) = &cfg.buses[0].kind else {
        panic!("not modbus-rtu")
    };
    let plan = ReadPlan::new(&fields, rtu.max_gap, rtu.max_registers);
    // One holding read of 0x0000-0x0018 (the values and the command registers) and one
    // input read of 0x0000-0x0001.
    let blocks: Vec<(RegisterKind, u16, u16)> = plan
        .blocks
        .iter()
        .map(|b| (b.kind, b.start, b.count))
        .collect();
    assert_eq!(
        blocks,
        [(RegisterKind::Holding, 0, 25), (RegisterKind::Input, 0, 2)]
    );
    for unit in [1u8, 2, 6] {
        for t_ms in [0u32, 1_234, 987_654] {
            let drive = model::DriveState::running(t_ms);
            let holding = model::registers(unit, t_ms, &drive);
            let input = model::input_registers(unit, t_ms, &drive);
            let truth = model::sample(unit, t_ms);
            let mut got = std::collections::BTreeMap::new();
            for block in &plan.blocks {
                let (start, end) = (
                    usize::from(block.start),
                    usize::from(block.start + block.count),
                );
                let (table, readable) = match block.kind {
                    RegisterKind::Holding => (
                        &holding[..],
                        model::holding_readable(block.start, block.count),
                    ),
                    RegisterKind::Input => {
                        (&input[..], model::input_readable(block.start, block.count))
                    }
                };
                assert!(readable, "servosim refuses {block:?}");
                let reply = &table[start..end];
                for &i in &block.fields {
                    let f = &fields[i];
                    let regs = field_registers(block, f, reply).unwrap();
                    got.insert(f.name.to_string(), f.decode(regs).unwrap());
                }
            }
            let close = |name: &str, want: f64, step: f64| {
                let v = got[name];
                assert!(
                    (v - want).abs() <= step,
                    "unit {unit} t {t_ms}: {name} {v} vs {want}"
                );
            };
            close("position", truth.position_mm, 0.001);
            close("velocity", truth.velocity_mm_s, 0.001);
            close("torque", truth.torque_pct, 0.1);
            close("current", truth.current_a, 0.01);
            close("temperature", truth.temperature_c, 0.1);
            assert_eq!(got["statusword"], f64::from(drive.statusword()));
            assert_eq!(got["fault_code"], 0.0);
            assert_eq!(got["mode"], 8.0);
            // The command registers at their start values.
            assert_eq!(got["modes_of_operation"], 8.0);
            assert_eq!(got["speed_limit"], 200.0);
            assert_eq!(got["target_position"], 0.0);
            // ~48 V with a ripple of 0.12 V and a small sag under load.
            assert!(
                (got["dc_bus"] - 48.0).abs() < 1.0,
                "dc_bus {}",
                got["dc_bus"]
            );
        }
    }
    let dc = fields.iter().find(|f| &*f.name == "dc_bus").unwrap();
    assert_eq!(
        (dc.data_type, dc.word_order),
        (DataType::U32, WordOrder::LowFirst)
    );
    assert_eq!(dc.unit.as_deref(), Some("V"));
}

#[test]
fn the_example_config_shows_a_modbus_bus_on_tty_usb0_and_a_canopen_bus_on_can0() {
    let cfg = load("example.toml");
    let kinds: Vec<&str> = cfg.buses.iter().map(|b| b.kind.protocol()).collect();
    assert_eq!(kinds, ["modbus-rtu", "canopen"]);
    let BusKind::Modbus(rtu) = &cfg.buses[0].kind else {
        panic!()
    };
    assert_eq!(rtu.link.to_string(), "/dev/ttyUSB0");
    let BusKind::Canopen(can) = &cfg.buses[1].kind else {
        panic!()
    };
    assert_eq!(can.interface, "can0");
    // The drive reads its mapping from the drive, scales position to mm and polls dc_bus.
    let drive = cfg.device("axis-5").unwrap().canopen.as_ref().unwrap();
    assert_eq!(drive.tpdos, None);
    assert_eq!(drive.objects.get(0x6064, 0).unwrap().scale, 0.001);
    assert_eq!(drive.polls.len(), 1);
    assert_eq!(&*drive.polls[0].object.name, "dc_bus");
    assert_eq!(
        cfg.device("axis-5").unwrap().address,
        DeviceAddress::Node(5)
    );
}

/// example.toml writes optional settings as `#key = value`; with the # removed (and an
/// mqtts:// url, which the TLS files need) the file must still be valid.
#[test]
fn the_commented_out_options_of_the_example_are_valid_too() {
    let path = configs_dir().join("example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut uncommented = 0;
    let all: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                uncommented += 1;
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .map(|l| {
            if l.starts_with("url = ") {
                "url = \"mqtts://broker.example:8883\"".to_owned()
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(uncommented >= 8, "found {uncommented} commented options");
    let cfg = config::parse(&all, &path).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.mqtt.tls);
    assert_eq!(
        cfg.mqtt.ca_file.as_deref(),
        Some(Path::new("/etc/servogate/ca.pem"))
    );
    assert!(cfg.mqtt.credentials_file.is_some());
    assert!(cfg.metrics.is_some());
    let protocols: Vec<&str> = cfg.buses.iter().map(|b| b.kind.protocol()).collect();
    assert_eq!(
        protocols,
        ["modbus-rtu", "modbus-tcp", "modbus-rtu-tcp", "canopen"]
    );
    let BusKind::Canopen(can) = &cfg.buses[3].kind else {
        panic!()
    };
    assert_eq!(can.sync_period, Some(Duration::from_millis(10)));
    let drive = cfg.device("axis-5").unwrap().canopen.as_ref().unwrap();
    let tpdos = drive.tpdos.as_ref().expect("the commented-out mappings");
    assert_eq!(tpdos[1].cob_id(), 0x285);
    assert_eq!(tpdos[1].entries()[2].index, 0x2010);
}

#[test]
fn the_error_in_the_example_header_is_what_servogate_prints() {
    // The header of example.toml quotes an error; keep it true.
    let path = configs_dir().join("example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let quoted = text
        .lines()
        .find_map(|l| l.strip_prefix("#   example.toml:"))
        .expect("a quoted error");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| *l == "bus = \"rs485-a\"")
        .expect("axis-2's bus");
    let mut bad = lines.clone();
    bad[at] = "bus = \"rs485-b\"";
    let e = config::parse(&bad.join("\n"), Path::new("example.toml")).unwrap_err();
    assert_eq!(e.to_string(), format!("example.toml:{quoted}"));
}

#[test]
fn errors_in_a_loaded_file_name_the_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("servogate-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let demo = std::fs::read_to_string(configs_dir().join("demo.toml")).unwrap();
    let bad = demo.replacen("unit = 3", "unit = 300", 1);
    std::fs::write(&path, &bad).unwrap();
    let line = bad.lines().position(|l| l == "unit = 300").unwrap() + 1;
    let e = config::load(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:{line}:8: devices[2].unit: 300 is not a Modbus unit id: must be 1 to 247",
            path.display()
        )
    );
    assert_eq!((e.line, e.column), (Some(line), Some(8)));
    assert_eq!(e.key.as_deref(), Some("devices[2].unit"));
    std::fs::remove_dir_all(&dir).unwrap();
}
