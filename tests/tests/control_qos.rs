//! QoS through the control channel: `qos.set` merges into what is set,
//! `qos.clear` clears all or some fields, `qos.show` gives the settings and
//! the counters, for net ports and disks alike; what is refused (with which
//! error code) changes nothing; and the settings are saved and come back
//! after the daemon is killed and started again. What the limits do to
//! traffic is tested in `qos*.rs`.

use std::path::PathBuf;

use serde_json::{json, Value};
use vioswitch_testkit::switch::{HarnessError, SwitchOptions, SwitchProcess};

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

/// Add disk `name` backed by a 1 MiB file in the run directory.
fn add_disk(sw: &mut SwitchProcess, name: &str) -> PathBuf {
    let p = sw.run_dir().join(format!("{name}.img"));
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    sw.call("disk.add", json!({"name": name, "path": p}))
        .expect("disk.add");
    p
}

/// The error code and message of a refused command (the message must say
/// something).
fn refusal(r: Result<Value, HarnessError>) -> (String, String) {
    match r {
        Err(HarnessError::Command { error, .. }) => {
            let m = error["message"].as_str().unwrap_or_default().to_string();
            assert!(!m.is_empty(), "{error}");
            (error["code"].as_str().unwrap_or_default().to_string(), m)
        }
        other => panic!("expected an error answer, got {other:?}"),
    }
}

fn code(r: Result<Value, HarnessError>) -> String {
    refusal(r).0
}

fn set(sw: &mut SwitchProcess, name: &str, fields: Value) -> Result<Value, HarnessError> {
    let mut args = fields;
    args["name"] = json!(name);
    sw.call("qos.set", args)
}

fn spec(sw: &mut SwitchProcess, name: &str) -> Value {
    sw.call("qos.show", json!({ "name": name }))
        .expect("qos.show")["qos"]
        .clone()
}

#[test]
fn a_net_port_qos_is_set_merged_cleared_and_shown() {
    let mut sw = switch();
    sw.add_port("p0").unwrap();
    sw.add_port("plain").unwrap();

    let show = sw.call("qos.show", json!({"name": "p0"})).unwrap();
    assert_eq!(
        (&show["name"], &show["kind"], &show["qos"]),
        (&json!("p0"), &json!("port"), &json!({})),
        "{show}"
    );
    for k in [
        "ingress_packets",
        "ingress_bytes",
        "ingress_throttled_ns",
        "egress_packets",
        "egress_bytes",
        "egress_throttled_ns",
        "ingress_policed",
        "egress_policed",
        "egress_queue_full",
    ] {
        assert_eq!(show["counters"][k], 0, "{k} in {show}");
    }
    assert_eq!(
        sw.call("qos.show", json!({})).unwrap(),
        json!([]),
        "nothing has QoS yet"
    );

    let r = set(
        &mut sw,
        "p0",
        json!({"ingress": {"rate": 100_000_000u64, "mode": "shape"}}),
    )
    .unwrap();
    assert_eq!(
        r,
        json!({"ingress": {"rate": 100_000_000u64, "mode": "shape", "unit": "bits"}})
    );
    // Fields not given stay, within a limit too.
    let r = set(
        &mut sw,
        "p0",
        json!({
            "ingress": {"burst": 1_000_000},
            "egress": {"rate": 10_000, "unit": "packets", "peak": 20_000, "peak_burst": 4},
            "weight": 3,
        }),
    )
    .unwrap();
    let want = json!({
        "ingress": {"rate": 100_000_000u64, "mode": "shape", "unit": "bits", "burst": 1_000_000},
        "egress": {"rate": 10_000, "mode": "police", "unit": "packets", "peak": 20_000, "peak_burst": 4},
        "weight": 3,
    });
    assert_eq!(r, want);
    assert_eq!(spec(&mut sw, "p0"), want);
    let r = set(
        &mut sw,
        "p0",
        json!({"egress": {"mode": "shape"}, "egress_queue": 1 << 20}),
    )
    .unwrap();
    assert_eq!(r["egress"]["mode"], "shape");
    assert_eq!(r["egress"]["rate"], 10_000);
    assert_eq!(r["egress_queue"], 1 << 20);
    // null removes a field, as in a JSON merge patch.
    let r = set(
        &mut sw,
        "p0",
        json!({"weight": null, "ingress": {"burst": null}}),
    )
    .unwrap();
    assert!(r.get("weight").is_none(), "{r}");
    assert!(r["ingress"].get("burst").is_none(), "{r}");
    assert_eq!(r["ingress"]["rate"], 100_000_000u64);
    // Nothing to merge: the spec as it is.
    assert_eq!(set(&mut sw, "p0", json!({})).unwrap(), r);

    // Only ports with QoS are listed.
    let all = sw.call("qos.show", json!({})).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["name"], "p0");
    assert_eq!(all[0]["qos"], r);
    assert!(all[0]["counters"]["egress_queue_full"].is_u64(), "{all}");
    // The port's own counters carry the QoS counters and drop reasons.
    let stats = sw.port_stats("p0").unwrap();
    assert_eq!(stats["qos"]["ingress_throttled_ns"], 0, "{stats}");
    assert_eq!(stats["drops"]["egress_queue_full"], 0, "{stats}");
    // Saved in the running configuration.
    let config = sw.call("config.show", json!({})).unwrap();
    let p0 = config["port"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "p0")
        .unwrap();
    assert_eq!(p0["qos"], r, "{config}");
    let toml = sw.call("config.show", json!({"format": "toml"})).unwrap();
    assert!(
        toml["toml"]
            .as_str()
            .unwrap()
            .contains("[port.qos.ingress]"),
        "{toml}"
    );

    // Clear some parts and fields, then everything.
    let r = sw
        .call(
            "qos.clear",
            json!({"name": "p0", "fields": ["egress.peak", "egress.peak_burst", "egress_queue"]}),
        )
        .unwrap();
    assert_eq!(
        r,
        json!({
            "ingress": {"rate": 100_000_000u64, "mode": "shape", "unit": "bits"},
            "egress": {"rate": 10_000, "mode": "shape", "unit": "packets"},
        })
    );
    let r = sw
        .call(
            "qos.clear",
            json!({"name": "p0", "fields": ["ingress", "weight"]}),
        )
        .unwrap();
    assert_eq!(
        r,
        json!({"egress": {"rate": 10_000, "mode": "shape", "unit": "packets"}})
    );
    let r = sw.call("qos.clear", json!({"name": "p0"})).unwrap();
    assert_eq!(r, json!({}));
    assert_eq!(spec(&mut sw, "p0"), json!({}));
    assert_eq!(sw.call("qos.show", json!({})).unwrap(), json!([]));
    // Clearing what is not set is no change.
    assert_eq!(
        sw.call("qos.clear", json!({"name": "plain", "fields": ["ingress"]}))
            .unwrap(),
        json!({})
    );
    let info = sw.call("switch.info", json!({})).unwrap();
    for c in ["qos.set", "qos.show", "qos.clear"] {
        assert!(
            info["commands"].as_array().unwrap().contains(&json!(c)),
            "{info}"
        );
    }
}

#[test]
fn a_disk_qos_is_set_merged_cleared_and_shown() {
    let mut sw = switch();
    add_disk(&mut sw, "d0");
    let show = sw.call("qos.show", json!({"name": "d0"})).unwrap();
    assert_eq!(show["kind"], "disk", "{show}");
    assert_eq!(show["qos"], json!({}), "{show}");
    assert_eq!(show["counters"]["throttled_ns"], 0, "{show}");
    for k in [
        "read",
        "write",
        "flush",
        "discard",
        "write_zeroes",
        "get_id",
    ] {
        assert_eq!(show["counters"]["ops"][k], 0, "{k} in {show}");
        assert_eq!(show["counters"]["bytes"][k], 0, "{k} in {show}");
    }

    let r = set(
        &mut sw,
        "d0",
        json!({"read_iops": {"rate": 1000}, "bps": {"rate": 50 << 20, "burst": 100 << 20}}),
    )
    .unwrap();
    assert_eq!(
        r,
        json!({"read_iops": {"rate": 1000}, "bps": {"rate": 50 << 20, "burst": 100 << 20}})
    );
    let r = set(
        &mut sw,
        "d0",
        json!({
            "read_iops": {"burst": 50},
            "write_iops": {"rate": 500},
            "iops": {"rate": 1200},
            "read_bps": {"rate": 10 << 20},
            "write_bps": {"rate": 20 << 20},
            "io_size": 65536,
            "weight": 1000,
        }),
    )
    .unwrap();
    let want = json!({
        "read_iops": {"rate": 1000, "burst": 50},
        "write_iops": {"rate": 500},
        "iops": {"rate": 1200},
        "read_bps": {"rate": 10 << 20},
        "write_bps": {"rate": 20 << 20},
        "bps": {"rate": 50 << 20, "burst": 100 << 20},
        "io_size": 65536,
        "weight": 1000,
    });
    assert_eq!(r, want);
    assert_eq!(spec(&mut sw, "d0"), want);
    let all = sw.call("qos.show", json!({})).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(
        (&all[0]["name"], &all[0]["kind"]),
        (&json!("d0"), &json!("disk"))
    );
    // disk.stats has the throttled time too.
    let stats = sw.call("disk.stats", json!({"name": "d0"})).unwrap();
    assert_eq!(stats["throttled_ns"], 0, "{stats}");
    let config = sw.call("config.show", json!({})).unwrap();
    assert_eq!(config["disk"][0]["qos"], want, "{config}");

    let r = sw
        .call(
            "qos.clear",
            json!({"name": "d0", "fields": ["read_iops.burst", "bps", "io_size", "weight"]}),
        )
        .unwrap();
    assert_eq!(
        r,
        json!({
            "read_iops": {"rate": 1000},
            "write_iops": {"rate": 500},
            "iops": {"rate": 1200},
            "read_bps": {"rate": 10 << 20},
            "write_bps": {"rate": 20 << 20},
        })
    );
    assert_eq!(
        sw.call("qos.clear", json!({"name": "d0"})).unwrap(),
        json!({})
    );
    assert_eq!(sw.call("qos.show", json!({})).unwrap(), json!([]));
}

#[test]
fn bad_qos_settings_are_refused_and_change_nothing() {
    let mut sw = switch();
    sw.add_port("p0").unwrap();
    add_disk(&mut sw, "d0");
    let port_qos = json!({
        "ingress": {"rate": 1_000_000, "mode": "shape", "unit": "bits", "peak": 2_000_000},
        "weight": 2,
    });
    let disk_qos = json!({"read_iops": {"rate": 100}, "weight": 2});
    assert_eq!(set(&mut sw, "p0", port_qos.clone()).unwrap(), port_qos);
    assert_eq!(set(&mut sw, "d0", disk_qos.clone()).unwrap(), disk_qos);
    let saved =
        |sw: &SwitchProcess| std::fs::read_to_string(sw.run_dir().join("state.json")).unwrap();
    let saved_before = saved(&sw);

    let refused_set = [
        // (port, fields, what the message must mention)
        ("p0", json!({"ingress": {"rate": 0}}), "rate"),
        (
            "p0",
            json!({"egress": {"rate": 0, "mode": "shape"}}),
            "rate",
        ),
        ("p0", json!({"ingress": {"peak": 10}}), "peak"),
        ("p0", json!({"egress": {"rate": 1000, "peak": 999}}), "peak"),
        ("p0", json!({"ingress": {"burst": 0}}), "burst"),
        ("p0", json!({"ingress": {"peak_burst": 0}}), "burst"),
        ("p0", json!({"egress": {"burst": 100}}), "rate"),
        ("p0", json!({"weight": 0}), "weight"),
        ("p0", json!({"weight": 1001}), "weight"),
        ("p0", json!({"weight": -1}), "weight"),
        ("p0", json!({"egress_queue": 1024}), "egress_queue"),
        ("p0", json!({"egress_queue": 128u64 << 20}), "egress_queue"),
        ("p0", json!({"read_iops": {"rate": 10}}), "read_iops"),
        ("p0", json!({"bps": {"rate": 10}}), "bps"),
        ("p0", json!({"io_size": 65536}), "io_size"),
        ("p0", json!({"ingress": {"mode": "drop"}}), "police"),
        ("p0", json!({"ingress": {"unit": "bytes"}}), "packets"),
        (
            "p0",
            json!({"ingress": {"rate": 10, "colour": 1}}),
            "colour",
        ),
        ("p0", json!({"ingress": 5}), "ingress"),
        ("p0", json!({"colour": "red"}), "colour"),
        ("d0", json!({"ingress": {"rate": 1000}}), "ingress"),
        ("d0", json!({"egress_queue": 65536}), "egress_queue"),
        ("d0", json!({"read_iops": {"rate": 0}}), "read_iops"),
        (
            "d0",
            json!({"write_bps": {"rate": 100, "burst": 0}}),
            "burst",
        ),
        ("d0", json!({"iops": {"burst": 10}}), "rate"),
        ("d0", json!({"io_size": 1024}), "io_size"),
        ("d0", json!({"io_size": 32 << 20}), "io_size"),
        ("d0", json!({"weight": 0}), "weight"),
        ("d0", json!({"weight": 1001}), "weight"),
        ("d0", json!({"read_iops": {"rate": 10, "peak": 20}}), "peak"),
    ];
    for (name, fields, mention) in refused_set {
        let (c, m) = refusal(set(&mut sw, name, fields.clone()));
        assert_eq!(c, "invalid_argument", "{name} {fields}: {m}");
        assert!(
            m.contains(mention),
            "{name} {fields}: {m:?} should say {mention}"
        );
    }
    let refused_clear = [
        ("p0", json!(["colour"]), "colour"),
        ("p0", json!(["ingress.rate"]), "clear ingress"),
        ("p0", json!(["ingress.colour"]), "peak"),
        ("p0", json!(["weight.x"]), "weight"),
        ("p0", json!(["read_iops"]), "read_iops"),
        ("p0", json!(["io_size"]), "io_size"),
        ("d0", json!(["ingress"]), "ingress"),
        ("d0", json!(["egress_queue"]), "egress_queue"),
        ("d0", json!(["read_iops.peak"]), "burst"),
        // One bad name refuses the whole list.
        ("p0", json!(["weight", "nope"]), "nope"),
        ("p0", json!("weight"), "sequence"),
    ];
    for (name, fields, mention) in refused_clear {
        let args = json!({"name": name, "fields": fields});
        let (c, m) = refusal(sw.call("qos.clear", args.clone()));
        assert_eq!(c, "invalid_argument", "{args}: {m}");
        assert!(m.contains(mention), "{args}: {m:?} should say {mention}");
    }
    assert_eq!(
        code(sw.call("qos.clear", json!({"name": "p0", "colour": 1}))),
        "invalid_argument"
    );
    assert_eq!(
        code(sw.call("qos.set", json!({"weight": 2}))),
        "invalid_argument"
    );
    assert_eq!(
        code(sw.call("qos.show", json!({"nme": "p0"}))),
        "invalid_argument"
    );
    for (cmd, args) in [
        ("qos.set", json!({"name": "nope", "weight": 2})),
        ("qos.clear", json!({"name": "nope"})),
        ("qos.clear", json!({"name": "nope", "fields": ["weight"]})),
        ("qos.show", json!({"name": "nope"})),
    ] {
        assert_eq!(
            code(sw.call(cmd, args.clone())),
            "not_found",
            "{cmd} {args}"
        );
    }

    assert_eq!(spec(&mut sw, "p0"), port_qos);
    assert_eq!(spec(&mut sw, "d0"), disk_qos);
    assert_eq!(saved(&sw), saved_before, "a refusal saved something");
    assert!(
        sw.call("port.list", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            == 1
            && sw
                .call("disk.list", json!({}))
                .unwrap()
                .as_array()
                .unwrap()
                .len()
                == 1
    );
}

#[test]
fn qos_is_saved_and_comes_back_after_a_kill_and_restart() {
    let run_dir = vioswitch_testkit::temp_dir("vioswitch-qos-persist").unwrap();
    let opts = || SwitchOptions {
        workers: 2,
        ..SwitchOptions::default()
    };
    let mut sw = SwitchProcess::spawn_in(&run_dir, opts()).unwrap();
    sw.add_port("p0").unwrap();
    sw.add_port("p1").unwrap();
    add_disk(&mut sw, "d0");
    set(
        &mut sw,
        "p0",
        json!({
            "ingress": {"rate": 50_000_000, "mode": "shape", "burst": 262_144},
            "egress": {"rate": 20_000, "unit": "packets", "mode": "shape", "peak": 40_000},
            "egress_queue": 1 << 20,
            "weight": 7,
        }),
    )
    .unwrap();
    set(&mut sw, "p1", json!({"weight": 1})).unwrap();
    set(
        &mut sw,
        "d0",
        json!({"iops": {"rate": 2000, "burst": 100}, "write_bps": {"rate": 1 << 20}, "io_size": 4096}),
    )
    .unwrap();
    let show = |sw: &mut SwitchProcess| {
        let mut all = sw.call("qos.show", json!({})).unwrap();
        for e in all.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("counters");
        }
        all
    };
    let before = show(&mut sw);
    assert_eq!(before.as_array().unwrap().len(), 3, "{before}");
    sw.kill();
    drop(sw);

    let mut sw = SwitchProcess::spawn_in(&run_dir, opts()).unwrap();
    assert_eq!(show(&mut sw), before, "QoS after SIGKILL and restart");
    // Changed after the restart, and again.
    sw.call("qos.clear", json!({"name": "p1"})).unwrap();
    set(&mut sw, "d0", json!({"iops": {"rate": 3000}})).unwrap();
    let before = show(&mut sw);
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");
    assert_eq!(
        before[0]["qos"]["iops"],
        json!({"rate": 3000, "burst": 100})
    );
    sw.kill();
    drop(sw);

    let mut sw = SwitchProcess::spawn_in(&run_dir, opts()).unwrap();
    assert_eq!(show(&mut sw), before, "QoS after a second restart");
    sw.kill();
    drop(sw);
    let _ = std::fs::remove_dir_all(&run_dir);
}
