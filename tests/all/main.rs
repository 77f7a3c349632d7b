//! End-to-end tests of nereid: real components (built by `cargo xtask plugins`) in the real
//! runtime, and the `nereid` binary. `cargo xtask test` builds the components first.
mod cli;
mod cluster;
mod common;
mod compress;
mod contract;
mod external;
mod fedavg;
mod federated;
mod fedprox;
mod hostile;
mod incremental;
mod inference;
mod javascript_plugins;
mod nn;
mod oci;
mod plugin_projects;
mod python_plugins;
mod pytorch;
mod replay;
mod router;
mod sampler;
mod sandbox;
mod sdk;
mod secrets;
mod strategies;
mod tls;
