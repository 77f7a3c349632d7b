//! The glue between wit-bindgen's static `Guest` traits and the SDK's `&mut self` traits, and the
//! `export_*!` macros that wire a plugin type into a component.

#[doc(hidden)]
pub mod glue {
    use std::any::Any;
    use std::cell::RefCell;

    use crate::{
        Adapter, Admission, Aggregator, ClientObjective, ClientUpdate, Compressor, Config, ConfigEntry, Decision,
        InputSpec, Metric, Model, NamedTensor, Plugin, PluginError, PluginInfo, RoundContext, Router, SampleRef,
        Sampler, Splitter, Tensor, TensorData,
    };

    thread_local! {
        // A component instance runs one plugin type; wasm32-wasip2 is single-threaded.
        static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    fn with<T: Plugin, R>(f: impl FnOnce(&mut T) -> R) -> R {
        STATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let state = slot.get_or_insert_with(|| Box::new(T::default()));
            match state.downcast_mut::<T>() {
                Some(t) => f(t),
                // Only reachable if one component exported two different plugin types.
                None => panic!("nereid-sdk: a component exports exactly one plugin type"),
            }
        })
    }

    pub fn describe<T: Plugin>() -> PluginInfo {
        T::info().into_inner()
    }

    pub fn configure<T: Plugin>(entries: Vec<ConfigEntry>) -> Result<(), PluginError> {
        let info = T::info();
        let config = Config::with_defaults(entries, info.schema());
        with::<T, _>(|p| p.configure(&config))
    }

    pub fn aggregator_begin_round<T: Aggregator>(
        ctx: RoundContext,
        global: Option<Vec<NamedTensor>>,
    ) -> Result<(), PluginError> {
        with::<T, _>(|p| p.begin_round(&ctx, global.map(Model::new)))
    }

    pub fn aggregator_accumulate<T: Aggregator>(update: ClientUpdate) -> Result<(), PluginError> {
        with::<T, _>(|p| p.accumulate(update.into()))
    }

    pub fn aggregator_finish<T: Aggregator>() -> Result<(Vec<NamedTensor>, Vec<Metric>), PluginError> {
        with::<T, _>(|p| p.finish()).map(|a| (a.model.into_tensors(), a.metrics))
    }

    pub fn aggregator_client_config<T: Aggregator>() -> Vec<ConfigEntry> {
        with::<T, _>(|p| p.client_config())
    }

    pub fn objective_begin_round<T: ClientObjective>(
        ctx: RoundContext,
        global: Vec<NamedTensor>,
        server: Vec<ConfigEntry>,
    ) -> Result<(), PluginError> {
        let server = Config::with_defaults(server, &[]);
        with::<T, _>(|p| p.begin_training(&ctx, Model::new(global), &server))
    }

    pub fn objective_penalty<T: ClientObjective>(name: String, weight: &Tensor) -> Result<f64, PluginError> {
        with::<T, _>(|p| p.penalty(&name, weight))
    }

    pub fn objective_adjust_gradient<T: ClientObjective>(
        name: String,
        weight: &Tensor,
        gradient: &Tensor,
    ) -> Result<(), PluginError> {
        with::<T, _>(|p| p.adjust_gradient(&name, weight, gradient))
    }

    pub fn router_decide<T: Router>(output: &Tensor) -> Result<Decision, PluginError> {
        with::<T, _>(|p| p.decide(output))
    }

    pub fn runner_run(model: String, inputs: Vec<TensorData>) -> Result<Vec<TensorData>, PluginError> {
        crate::nn::run(&model, inputs)
    }

    pub fn splitter_plan<T: Splitter>(
        model: Vec<u8>,
        profile: String,
        link: crate::Link,
    ) -> Result<Vec<crate::CutPoint>, PluginError> {
        with::<T, _>(|p| p.plan(&model, &profile, link))
    }

    pub fn sampler_restore<T: Sampler>(held: Vec<SampleRef>, offered: u64) -> Result<(), PluginError> {
        with::<T, _>(|p| p.restore(&held, offered))
    }

    pub fn sampler_offer<T: Sampler>(sample: SampleRef) -> Result<Admission, PluginError> {
        with::<T, _>(|p| p.offer(sample))
    }

    pub fn sampler_draw<T: Sampler>(ctx: RoundContext, count: u32) -> Result<Vec<u64>, PluginError> {
        with::<T, _>(|p| p.draw(&ctx, count))
    }

    pub fn compressor_encode<T: Compressor>(
        ctx: RoundContext,
        update: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, PluginError> {
        with::<T, _>(|p| p.encode(&ctx, update))
    }

    pub fn compressor_decode<T: Compressor>(
        ctx: RoundContext,
        payload: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, PluginError> {
        with::<T, _>(|p| p.decode(&ctx, payload))
    }

    pub fn compressor_rewrite_model<T: Compressor>(
        model: Vec<u8>,
        calibration: Vec<Vec<NamedTensor>>,
    ) -> Result<Vec<u8>, PluginError> {
        with::<T, _>(|p| p.rewrite_model(&model, calibration))
    }

    pub fn adapter_decode<T: Adapter>(
        content_type: String,
        payload: Vec<u8>,
        inputs: Vec<InputSpec>,
    ) -> Result<Vec<TensorData>, PluginError> {
        with::<T, _>(|p| p.decode(&content_type, &payload, &inputs))
    }

    pub fn splitter_partition<T: Splitter>(
        model: Vec<u8>,
        cut: Vec<String>,
    ) -> Result<(Vec<u8>, Vec<u8>), PluginError> {
        with::<T, _>(|p| p.partition(&model, &cut))
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __nereid_impl_runner {
    ($export:ident) => {
        impl exports::nereid::plugin::runner::Guest for $export {
            fn run(
                model: ::std::string::String,
                inputs: ::std::vec::Vec<$crate::TensorData>,
            ) -> ::core::result::Result<::std::vec::Vec<$crate::TensorData>, $crate::PluginError> {
                $crate::__glue::runner_run(model, inputs)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __nereid_impl_plugin {
    ($export:ident, $t:ty) => {
        impl exports::nereid::plugin::plugin::Guest for $export {
            fn describe() -> $crate::PluginInfo {
                $crate::__glue::describe::<$t>()
            }
            fn configure(
                config: ::std::vec::Vec<$crate::ConfigEntry>,
            ) -> ::core::result::Result<(), $crate::PluginError> {
                $crate::__glue::configure::<$t>(config)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __nereid_impl_aggregator {
    ($export:ident, $t:ty) => {
        impl exports::nereid::plugin::aggregator::Guest for $export {
            fn begin_round(
                ctx: $crate::RoundContext,
                global: ::core::option::Option<::std::vec::Vec<$crate::NamedTensor>>,
            ) -> ::core::result::Result<(), $crate::PluginError> {
                $crate::__glue::aggregator_begin_round::<$t>(ctx, global)
            }
            fn accumulate(update: $crate::ClientUpdate) -> ::core::result::Result<(), $crate::PluginError> {
                $crate::__glue::aggregator_accumulate::<$t>(update)
            }
            fn finish() -> ::core::result::Result<exports::nereid::plugin::aggregator::Aggregate, $crate::PluginError> {
                $crate::__glue::aggregator_finish::<$t>()
                    .map(|(tensors, metrics)| exports::nereid::plugin::aggregator::Aggregate { tensors, metrics })
            }
            fn client_config() -> ::std::vec::Vec<$crate::ConfigEntry> {
                $crate::__glue::aggregator_client_config::<$t>()
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __nereid_impl_client_objective {
    ($export:ident, $t:ty) => {
        impl exports::nereid::plugin::client_objective::Guest for $export {
            fn begin_round(
                ctx: $crate::RoundContext,
                global: ::std::vec::Vec<$crate::NamedTensor>,
                server_config: ::std::vec::Vec<$crate::ConfigEntry>,
            ) -> ::core::result::Result<(), $crate::PluginError> {
                $crate::__glue::objective_begin_round::<$t>(ctx, global, server_config)
            }
            fn penalty(
                name: ::std::string::String,
                weight: &$crate::Tensor,
            ) -> ::core::result::Result<f64, $crate::PluginError> {
                $crate::__glue::objective_penalty::<$t>(name, weight)
            }
            fn adjust_gradient(
                name: ::std::string::String,
                weight: &$crate::Tensor,
                gradient: &$crate::Tensor,
            ) -> ::core::result::Result<(), $crate::PluginError> {
                $crate::__glue::objective_adjust_gradient::<$t>(name, weight, gradient)
            }
        }
    };
}

/// Exports `$t` (an [`Aggregator`](crate::Aggregator)) as a component of world `aggregator-plugin`.
/// Use once, at the crate root.
#[macro_export]
macro_rules! export_aggregator {
    ($t:ty) => {
        $crate::__nereid_generate!("aggregator-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        $crate::__nereid_impl_aggregator!(NereidPluginExport, $t);
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (a [`ClientObjective`](crate::ClientObjective)) as a component of world
/// `client-objective-plugin`. Use once, at the crate root.
#[macro_export]
macro_rules! export_client_objective {
    ($t:ty) => {
        $crate::__nereid_generate!("client-objective-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        $crate::__nereid_impl_client_objective!(NereidPluginExport, $t);
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (both an [`Aggregator`](crate::Aggregator) and a
/// [`ClientObjective`](crate::ClientObjective)) as a component of world `strategy-plugin`, loadable into
/// either slot. Use once, at the crate root.
#[macro_export]
macro_rules! export_strategy {
    ($t:ty) => {
        $crate::__nereid_generate!("strategy-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        $crate::__nereid_impl_aggregator!(NereidPluginExport, $t);
        $crate::__nereid_impl_client_objective!(NereidPluginExport, $t);
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (a [`Router`](crate::Router)) as a component of world `router-plugin`. Use once,
/// at the crate root.
#[macro_export]
macro_rules! export_router {
    ($t:ty) => {
        $crate::__nereid_generate!("router-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        impl exports::nereid::plugin::router::Guest for NereidPluginExport {
            fn decide(
                output: &$crate::Tensor,
            ) -> ::core::result::Result<exports::nereid::plugin::router::Decision, $crate::PluginError> {
                use exports::nereid::plugin::router::{Decision, Route};
                $crate::__glue::router_decide::<$t>(output).map(|d| Decision {
                    route: match d.route {
                        $crate::Route::Edge => Route::Edge,
                        $crate::Route::Cloud => Route::Cloud,
                    },
                    score: d.score,
                })
            }
        }
        $crate::__nereid_impl_runner!(NereidPluginExport);
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (a [`Splitter`](crate::Splitter)) as a component of world `splitter-plugin`. Use
/// once, at the crate root.
#[macro_export]
macro_rules! export_splitter {
    ($t:ty) => {
        $crate::__nereid_generate!("splitter-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        impl exports::nereid::plugin::splitter::Guest for NereidPluginExport {
            fn plan(
                model: ::std::vec::Vec<u8>,
                profile: ::std::string::String,
                link: exports::nereid::plugin::splitter::Link,
            ) -> ::core::result::Result<
                ::std::vec::Vec<exports::nereid::plugin::splitter::CutPoint>,
                $crate::PluginError,
            > {
                let link = $crate::Link { bandwidth_mbit_s: link.bandwidth_mbit_s, rtt_ms: link.rtt_ms };
                $crate::__glue::splitter_plan::<$t>(model, profile, link).map(|cuts| {
                    cuts.into_iter()
                        .map(|c| exports::nereid::plugin::splitter::CutPoint {
                            tensors: c.tensors,
                            predicted_ms: c.predicted_ms,
                        })
                        .collect()
                })
            }
            fn partition(
                model: ::std::vec::Vec<u8>,
                cut: ::std::vec::Vec<::std::string::String>,
            ) -> ::core::result::Result<(::std::vec::Vec<u8>, ::std::vec::Vec<u8>), $crate::PluginError> {
                $crate::__glue::splitter_partition::<$t>(model, cut)
            }
        }
        $crate::__nereid_impl_runner!(NereidPluginExport);
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (an [`Adapter`](crate::Adapter)) as a component of world `adapter-plugin`. Use
/// once, at the crate root.
#[macro_export]
macro_rules! export_adapter {
    ($t:ty) => {
        $crate::__nereid_generate!("adapter-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        impl exports::nereid::plugin::adapter::Guest for NereidPluginExport {
            fn decode(
                content_type: ::std::string::String,
                payload: ::std::vec::Vec<u8>,
                inputs: ::std::vec::Vec<exports::nereid::plugin::adapter::InputSpec>,
            ) -> ::core::result::Result<::std::vec::Vec<$crate::TensorData>, $crate::PluginError> {
                let inputs = inputs
                    .into_iter()
                    .map(|i| $crate::InputSpec {
                        name: i.name,
                        dtype: i.dtype,
                        shape: i.shape.into_iter().map(|d| u64::try_from(d).ok()).collect(),
                    })
                    .collect();
                $crate::__glue::adapter_decode::<$t>(content_type, payload, inputs)
            }
        }
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (a [`Sampler`](crate::Sampler)) as a component of world `sampler-plugin`. Use
/// once, at the crate root.
#[macro_export]
macro_rules! export_sampler {
    ($t:ty) => {
        $crate::__nereid_generate!("sampler-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        impl exports::nereid::plugin::sampler::Guest for NereidPluginExport {
            fn restore(
                held: ::std::vec::Vec<exports::nereid::plugin::sampler::SampleRef>,
                offered: u64,
            ) -> ::core::result::Result<(), $crate::PluginError> {
                let held = held.into_iter().map(|s| $crate::SampleRef { id: s.id, label: s.label }).collect();
                $crate::__glue::sampler_restore::<$t>(held, offered)
            }
            fn offer(
                sample: exports::nereid::plugin::sampler::SampleRef,
            ) -> ::core::result::Result<exports::nereid::plugin::sampler::Admission, $crate::PluginError> {
                use exports::nereid::plugin::sampler::Admission;
                let sample = $crate::SampleRef { id: sample.id, label: sample.label };
                $crate::__glue::sampler_offer::<$t>(sample).map(|a| match a {
                    $crate::Admission::Keep(evict) => Admission::Keep(evict),
                    $crate::Admission::Discard => Admission::Discard,
                })
            }
            fn draw(
                ctx: $crate::RoundContext,
                count: u32,
            ) -> ::core::result::Result<::std::vec::Vec<u64>, $crate::PluginError> {
                $crate::__glue::sampler_draw::<$t>(ctx, count)
            }
        }
        export!(NereidPluginExport);
    };
}

/// Exports `$t` (a [`Compressor`](crate::Compressor)) as a component of world `compressor-plugin`.
/// Use once, at the crate root.
#[macro_export]
macro_rules! export_compressor {
    ($t:ty) => {
        $crate::__nereid_generate!("compressor-plugin");
        struct NereidPluginExport;
        $crate::__nereid_impl_plugin!(NereidPluginExport, $t);
        impl exports::nereid::plugin::compressor::Guest for NereidPluginExport {
            fn encode(
                ctx: $crate::RoundContext,
                tensors: ::std::vec::Vec<$crate::NamedTensor>,
            ) -> ::core::result::Result<::std::vec::Vec<$crate::NamedTensor>, $crate::PluginError> {
                $crate::__glue::compressor_encode::<$t>(ctx, tensors)
            }
            fn decode(
                ctx: $crate::RoundContext,
                payload: ::std::vec::Vec<$crate::NamedTensor>,
            ) -> ::core::result::Result<::std::vec::Vec<$crate::NamedTensor>, $crate::PluginError> {
                $crate::__glue::compressor_decode::<$t>(ctx, payload)
            }
            fn rewrite_model(
                model: ::std::vec::Vec<u8>,
                calibration: ::std::vec::Vec<::std::vec::Vec<$crate::NamedTensor>>,
            ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::PluginError> {
                $crate::__glue::compressor_rewrite_model::<$t>(model, calibration)
            }
        }
        export!(NereidPluginExport);
    };
}
