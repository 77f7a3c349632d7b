//! Plugins written in JavaScript (componentize-js, `sdk/js`): the third language. Its FedAvg gives
//! the Rust FedAvg's result and refuses what it refuses in the same words, and a JavaScript
//! plugin that loops or allocates without bound is stopped by the same limits.
use crate::python_plugins::{
    gives_the_rust_fedavgs_result, refuses_what_the_rust_fedavg_refuses, stopped_by_the_limits_and_the_host_goes_on,
};

#[test]
fn a_javascript_fedavg_gives_the_rust_fedavgs_result() {
    gives_the_rust_fedavgs_result("fedavg-js");
}

#[test]
fn a_javascript_fedavg_refuses_what_the_rust_one_refuses_in_the_same_words() {
    refuses_what_the_rust_fedavg_refuses(&["fedavg-js", "fedavg-py", "fedavg"]);
}

#[test]
fn a_javascript_plugin_that_loops_or_hogs_memory_is_stopped_and_the_host_goes_on() {
    stopped_by_the_limits_and_the_host_goes_on("misbehave-js");
}
