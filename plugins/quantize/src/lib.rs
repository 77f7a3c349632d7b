//! Compression passes (compressor slot).
//!
//! On models (`rewrite-model`, chosen by `model_pass`): INT8 weights of MatMul, Gemm and Conv,
//! symmetric per output channel, either weight-only (`int8-weight-only`), with MatMul/Gemm
//! computing in integers on activations quantized at run time (`int8-dynamic`), or static QDQ
//! with activation ranges calibrated on the samples the host passes (`int8-static`); or
//! unstructured magnitude pruning to `sparsity` (`prune`).
//!
//! On federated updates (`encode` on the edge, `decode` on the cloud, chosen by `update`): INT8
//! with one scale per tensor and stochastic rounding (`int8`), or the `top_k_fraction` largest
//! magnitudes per tensor with error feedback (`top-k`): what a round did not send is added to the
//! next round's update, so the sum of what was sent converges to the sum of the true updates.
mod graph;
mod update;

use nereid_sdk::prelude::*;
use nereid_sdk::{NamedTensor, TensorData};

use graph::ModelPass;
use update::{Rounding, TopK};

#[derive(Clone, Copy, PartialEq)]
enum UpdateCoding {
    Int8,
    TopK,
}

struct Quantize {
    pass: ModelPass,
    coding: UpdateCoding,
    rounding: Rounding,
    top_k: TopK,
    bias_correction: bool,
    float_inputs: Vec<String>,
}

impl Default for Quantize {
    fn default() -> Self {
        Quantize {
            pass: ModelPass::WeightOnly,
            coding: UpdateCoding::Int8,
            rounding: Rounding::Stochastic,
            top_k: TopK::new(0.1, true),
            bias_correction: true,
            float_inputs: Vec::new(),
        }
    }
}

impl Plugin for Quantize {
    fn info() -> Info {
        Info::new("quantize", "0.1.0", "INT8 quantization and pruning of ONNX models; INT8 and top-k update encoding")
            .text(
                "model_pass",
                Some("int8-weight-only"),
                "What rewrite-model does: int8-weight-only, int8-dynamic, int8-static (needs calibration samples) or prune",
            )
            .boolean(
                "bias_correction",
                Some(true),
                "INT8 passes given calibration samples: subtract the mean output shift INT8 weights cause from each Conv/Gemm bias",
            )
            .text(
                "float_inputs",
                Some(""),
                "int8-dynamic and int8-static: comma-separated names of MatMul/Gemm/Conv nodes whose activation input stays float (weights still INT8), for layers sensitive to activation rounding",
            )
            .float("sparsity", Some(0.5), "prune: the share of each weight's elements set to zero, in [0, 1)")
            .text("update", Some("int8"), "How updates travel: int8 (per-tensor scale) or top-k (with error feedback)")
            .text("rounding", Some("stochastic"), "int8 updates: stochastic (unbiased) or nearest")
            .float("top_k_fraction", Some(0.1), "top-k: the share of each tensor's elements sent, in (0, 1]")
            .boolean("error_feedback", Some(true), "top-k: carry what was not sent into the next round's update")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        let sparsity = config.f64("sparsity")?;
        if !(0.0..1.0).contains(&sparsity) {
            return Err(PluginError::invalid_config("sparsity", "must be in [0, 1)"));
        }
        self.pass = match config.text("model_pass")? {
            "int8-weight-only" => ModelPass::WeightOnly,
            "int8-dynamic" => ModelPass::Dynamic,
            "int8-static" => ModelPass::Static,
            "prune" => ModelPass::Prune { sparsity },
            other => {
                return Err(PluginError::invalid_config(
                    "model_pass",
                    format!("`{other}`: expected int8-weight-only, int8-dynamic, int8-static or prune"),
                ))
            }
        };
        self.coding = match config.text("update")? {
            "int8" => UpdateCoding::Int8,
            "top-k" => UpdateCoding::TopK,
            other => return Err(PluginError::invalid_config("update", format!("`{other}`: expected int8 or top-k"))),
        };
        self.rounding = match config.text("rounding")? {
            "stochastic" => Rounding::Stochastic,
            "nearest" => Rounding::Nearest,
            other => {
                return Err(PluginError::invalid_config(
                    "rounding",
                    format!("`{other}`: expected stochastic or nearest"),
                ))
            }
        };
        let fraction = config.f64("top_k_fraction")?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(PluginError::invalid_config("top_k_fraction", "must be in (0, 1]"));
        }
        self.top_k = TopK::new(fraction, config.bool("error_feedback")?);
        self.bias_correction = config.bool("bias_correction")?;
        self.float_inputs = config
            .text("float_inputs")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        Ok(())
    }
}

/// A host tensor as a by-value tensor for wasi-nn.
fn to_data(t: &NamedTensor) -> Result<TensorData, PluginError> {
    match t.value.dtype() {
        DType::F32 => Ok(TensorData::f32(&t.name, t.value.shape(), &update::read_all(&t.value)?)),
        other => Err(PluginError::rejected(format!("calibration input `{}` is {other}, not f32", t.name))),
    }
}

impl Compressor for Quantize {
    fn encode(&mut self, ctx: &RoundContext, update: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        match self.coding {
            UpdateCoding::Int8 => update::encode_int8(ctx, update, self.rounding),
            UpdateCoding::TopK => self.top_k.encode(update),
        }
    }

    fn decode(&mut self, _ctx: &RoundContext, payload: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        update::decode(payload)
    }

    fn rewrite_model(&mut self, model: &[u8], calibration: Vec<Vec<NamedTensor>>) -> Result<Vec<u8>, PluginError> {
        let samples = calibration
            .iter()
            .map(|s| s.iter().map(to_data).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()?;
        let options = graph::Options {
            pass: self.pass,
            bias_correction: self.bias_correction,
            float_inputs: self.float_inputs.clone(),
        };
        graph::rewrite(model, &options, &samples)
    }
}

nereid_sdk::export_compressor!(Quantize);
