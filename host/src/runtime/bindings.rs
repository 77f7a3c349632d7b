//! Host-side bindings of `wit/nereid.wit`, generated from the union world `host-bindings`; each
//! slot loads only its own exported interface from an instance.
wasmtime::component::bindgen!({
    path: "../wit",
    world: "host-bindings",
    imports: { default: trappable },
    with: {
        "nereid:plugin/tensors.tensor": crate::runtime::state::TensorSlot,
    },
});

pub use self::exports::nereid::plugin::{
    adapter, aggregator, client_objective, compressor, plugin, router, runner, sampler, splitter,
};
pub use self::nereid::plugin::{model, types};
