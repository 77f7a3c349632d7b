//! The sandbox: slots, time and memory limits, no ambient authority, fresh instances after a
//! failure, the compile cache.
use std::time::Duration;

use nereid::aggregate::run_round;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{
    AggregatorPlugin, CacheOutcome, Limits, ObjectivePlugin, PluginError, RoundContext, Runtime, Slot,
};

use crate::common::*;

fn misbehave(rt: &Runtime, mode: &str, trigger: &str, limits: Limits) -> Result<AggregatorPlugin, PluginError> {
    let cfg = config(&[("mode", toml::Value::String(mode.into())), ("trigger", toml::Value::String(trigger.into()))]);
    AggregatorPlugin::load(rt, &plugin("test-misbehave"), limits, &cfg)
}

fn small(v: f32) -> nereid::model_io::NamedTensors {
    model(&[("w", f32s(&[2], &[v, v]))])
}

#[test]
fn a_component_in_the_wrong_slot_is_refused_naming_both_worlds() {
    let (rt, _dir) = runtime();
    let err =
        ObjectivePlugin::load(&rt, &plugin("fedavg"), Limits::default(), &ConfigTable::new()).expect_err("wrong slot");
    match &err {
        PluginError::WrongSlot { expected, actual, .. } => {
            assert_eq!(*expected, "client-objective-plugin");
            assert_eq!(actual, "world `aggregator-plugin`");
        }
        other => panic!("expected WrongSlot, got {other}"),
    }
    assert!(
        err.to_string().contains("nereid_fedavg.wasm: wrong slot: expected world `client-objective-plugin`"),
        "{err}"
    );
    // A strategy component fits both slots.
    let loaded = rt.load_file(&plugin("fedprox")).expect("load");
    assert_eq!(loaded.slots, vec![Slot::Aggregator, Slot::ClientObjective]);
}

#[test]
fn a_plugin_that_loops_forever_is_stopped_and_the_host_keeps_working() {
    let (rt, _dir) = runtime();
    let limits = Limits { call_timeout: Duration::from_millis(200), ..Limits::default() };
    let mut p = misbehave(&rt, "spin", "bad", limits).expect("loads");
    p.begin_round(&RoundContext::default(), None).expect("begin");
    p.accumulate(&update("ok", 1, small(1.0))).expect("ok");
    let started = std::time::Instant::now();
    let err = p.accumulate(&update("bad", 1, small(2.0))).expect_err("spins");
    assert!(started.elapsed() < Duration::from_secs(5), "stopped near its limit, took {:?}", started.elapsed());
    assert!(matches!(&err, PluginError::Timeout { plugin, call: "accumulate", .. } if plugin == "misbehave"), "{err}");
    assert!(err.instance_lost());
    // The next call runs on a fresh, configured instance.
    p.begin_round(&RoundContext::default(), None).expect("fresh instance");
    p.accumulate(&update("ok", 2, small(4.0))).expect("works again");
    assert_eq!(get(&p.finish().expect("finish").tensors, "w").as_f32(), Some(&[4.0f32, 4.0][..]));
    assert_eq!(p.sandbox().instantiations(), 2);
}

#[test]
fn a_round_leaves_out_the_update_that_killed_the_plugin_and_keeps_the_others() {
    let (rt, _dir) = runtime();
    let limits = Limits { call_timeout: Duration::from_millis(200), ..Limits::default() };
    let mut p = misbehave(&rt, "spin", "c1", limits).expect("loads");
    let ups = [update("c0", 1, small(1.0)), update("c1", 1, small(100.0)), update("c2", 3, small(5.0))];
    let report = run_round(&mut p, &RoundContext::default(), None, ups.len(), |i| Ok(ups[i].clone())).expect("round");
    assert_eq!(report.accepted, vec!["c0", "c2"]);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].update, "c1");
    assert!(report.rejected[0].reason.contains("time limit"), "{}", report.rejected[0].reason);
    assert_eq!(report.restarts, 1);
    // (1*1 + 3*5) / 4 = 4: c0 was replayed into the fresh instance, c1 left out.
    assert_eq!(get(&report.result.tensors, "w").as_f32(), Some(&[4.0f32, 4.0][..]));
}

#[test]
fn a_plugin_that_allocates_without_bound_is_stopped_by_the_memory_limit() {
    let (rt, _dir) = runtime();
    let limits = Limits { memory_bytes: 32 << 20, ..Limits::default() };
    let mut p = misbehave(&rt, "hog", "bad", limits).expect("loads");
    p.begin_round(&RoundContext::default(), None).expect("begin");
    let err = p.accumulate(&update("bad", 1, small(1.0))).expect_err("hogs");
    assert!(matches!(&err, PluginError::OutOfMemory { call: "accumulate", limit, .. } if *limit == 32 << 20), "{err}");
    p.begin_round(&RoundContext::default(), None).expect("fresh instance");
    p.accumulate(&update("fine", 1, small(1.0))).expect("works again");
}

#[test]
fn host_tensors_a_plugin_creates_are_bounded_too() {
    let (rt, _dir) = runtime();
    let limits = Limits { tensor_bytes: 16 << 20, ..Limits::default() };
    let mut p = misbehave(&rt, "tensor-hog", "bad", limits).expect("loads");
    p.begin_round(&RoundContext::default(), None).expect("begin");
    let err = p.accumulate(&update("bad", 1, small(1.0))).expect_err("refused");
    // The host refuses the allocation; the plugin reports it; the instance survives.
    assert!(matches!(&err, PluginError::Internal { .. }), "{err}");
    assert!(err.to_string().contains("tensor limit"), "{err}");
    assert!(!err.instance_lost());
}

#[test]
fn a_panic_is_a_trap_whose_message_reaches_the_error() {
    let (rt, _dir) = runtime();
    let mut p = misbehave(&rt, "panic", "bad", Limits::default()).expect("loads");
    p.begin_round(&RoundContext::default(), None).expect("begin");
    let err = p.accumulate(&update("bad", 1, small(1.0))).expect_err("panics");
    assert!(matches!(&err, PluginError::Trap { call: "accumulate", .. }), "{err}");
    assert!(err.to_string().contains("deliberate panic"), "{err}");
}

#[test]
fn a_plugin_gets_no_files_no_environment_no_network() {
    std::env::set_var("NEREID_SECRET_FOR_PROBE", "leak");
    let (rt, _dir) = runtime();
    let mut p = misbehave(&rt, "probe", "", Limits::default()).expect("loads");
    p.begin_round(&RoundContext::default(), None).expect("begin");
    p.accumulate(&update("a", 1, small(1.0))).expect("a");
    let out = p.finish().expect("finish");
    for key in ["readable_paths", "created_files", "env_vars", "args", "tcp_connections"] {
        let value = out.metrics.iter().find(|(k, _)| k == key).map(|m| m.1);
        assert_eq!(value, Some(0.0), "{key}: the sandbox leaked ambient authority");
    }
}

#[test]
fn misbehaving_in_configure_fails_the_load_with_the_call_named() {
    let (rt, _dir) = runtime();
    let limits = Limits { call_timeout: Duration::from_millis(100), ..Limits::default() };
    let err = misbehave(&rt, "spin", "configure", limits).expect_err("times out");
    assert!(matches!(err, PluginError::Timeout { call: "configure", .. }), "{err}");
}

#[test]
fn the_second_load_hits_the_compile_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Runtime::new(Some(dir.path().to_path_buf())).expect("runtime");
    assert_eq!(first.load_file(&plugin("fedavg")).expect("load").cache, CacheOutcome::Compiled);
    assert_eq!(first.load_file(&plugin("fedavg")).expect("load").cache, CacheOutcome::Hit);
    // Another process (a new engine) with the same cache directory does not compile either.
    let second = Runtime::new(Some(dir.path().to_path_buf())).expect("runtime");
    let loaded = second.load_file(&plugin("fedavg")).expect("load");
    assert_eq!(loaded.cache, CacheOutcome::Hit);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("compiled")).expect("cache dir").flatten().collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].file_name().to_string_lossy().starts_with(loaded.digest.trim_start_matches("sha256:")));
    // A cached plugin works.
    let mut p = AggregatorPlugin::new(&second, loaded, Limits::default(), &ConfigTable::new()).expect("instantiate");
    p.begin_round(&RoundContext::default(), None).expect("begin");

    let uncached = Runtime::new(None).expect("runtime");
    assert_eq!(uncached.load_file(&plugin("fedavg")).expect("load").cache, CacheOutcome::Compiled);
    assert_eq!(uncached.load_file(&plugin("fedavg")).expect("load").cache, CacheOutcome::Compiled);
}

#[test]
fn garbage_is_not_a_component() {
    let (rt, dir) = runtime();
    let path = dir.path().join("junk.wasm");
    std::fs::write(&path, b"\0asm\x01\0\0\0garbage").expect("write");
    let err = rt.load_file(&path).err().expect("junk");
    assert!(matches!(err, PluginError::Compile { .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("{}: not a valid WebAssembly component", path.display())), "{err}");
    let missing = rt.load_file(&dir.path().join("nope.wasm")).err().expect("missing");
    assert!(missing.to_string().contains("nope.wasm"), "{missing}");
}
