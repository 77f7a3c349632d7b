//! {{name}}: a router (joint inference, edge, per request). As written the edge's answer stands
//! when the model's top class probability reaches `threshold`; otherwise the example goes to the
//! cloud. `nereid plugin build` builds it and runs the slot's checks.
use nereid_sdk::prelude::*;

#[derive(Default)]
struct Policy {
    threshold: f64,
}

impl Plugin for Policy {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "Sends an example to the cloud when the edge is unsure")
            .float("threshold", Some(0.8), "Top class probability at which the edge's answer stands, in [0, 1]")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.threshold = config.f64("threshold")?;
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(PluginError::invalid_config("threshold", format!("must be in [0, 1], got {}", self.threshold)));
        }
        Ok(())
    }
}

impl Router for Policy {
    fn decide(&mut self, output: &Tensor) -> Result<Decision, PluginError> {
        let n = output.numel().min(u64::from(nereid_sdk::max_chunk())) as u32;
        let score = output.read(0, n)?.into_iter().fold(f64::NEG_INFINITY, f64::max);
        if !score.is_finite() {
            return Err(PluginError::rejected("the model's output is empty or not finite"));
        }
        let route = if score >= self.threshold { Route::Edge } else { Route::Cloud };
        Ok(Decision { route, score })
    }
}

nereid_sdk::export_router!(Policy);
