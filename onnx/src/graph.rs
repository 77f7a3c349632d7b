//! Cuts of an ONNX graph: which sets of tensors separate its inputs from its outputs, and the two
//! models (head and tail) a cut makes.
use std::collections::{BTreeSet, HashMap, HashSet};

use prost::Message;

use crate::proto::{GraphProto, ModelProto, ValueInfoProto};
use crate::OnnxError;

/// Most nodes a model's graph may have: planning a split walks every cut along the node order,
/// which costs up to nodes x live tensors (large transformer graphs have some 10,000 nodes).
pub const MAX_NODES: usize = 100_000;

/// A model read for cutting: its nodes in a topological order, each named.
#[derive(Debug, Clone)]
pub struct Model {
    proto: ModelProto,
}

/// What a cut leaves on each side. An empty half is `None`: the edge-only cut has no tail, the
/// cloud-only cut no head.
#[derive(Debug, Clone)]
pub struct Partition {
    pub head: Option<ModelProto>,
    pub tail: Option<ModelProto>,
    /// Nodes run on the edge (by name).
    pub head_nodes: Vec<String>,
    /// Nodes run in the cloud (by name).
    pub tail_nodes: Vec<String>,
    /// Cut tensors that are inputs of the whole model: the edge sends them as they came.
    pub passthrough: Vec<String>,
}

impl Model {
    /// Decodes a model and brings it to the form cuts are computed on: nodes in a topological
    /// order, unnamed nodes named `<op_type>_<index>` (profiles refer to nodes by name).
    pub fn decode(bytes: &[u8]) -> Result<Model, OnnxError> {
        let proto = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
        Model::new(proto)
    }

    pub fn new(mut proto: ModelProto) -> Result<Model, OnnxError> {
        let graph = proto.graph.as_mut().ok_or(OnnxError::NoGraph)?;
        if graph.node.len() > MAX_NODES {
            return Err(OnnxError::Invalid(format!(
                "{} nodes; a model may have at most {MAX_NODES}",
                graph.node.len()
            )));
        }
        sort_topologically(graph)?;
        let mut seen = HashSet::new();
        for (index, node) in graph.node.iter_mut().enumerate() {
            if node.name.is_empty() || seen.contains(&node.name) {
                node.name = format!("{}_{index}", node.op_type);
            }
            seen.insert(node.name.clone());
        }
        Ok(Model { proto })
    }

    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    pub fn into_proto(self) -> ModelProto {
        self.proto
    }

    pub fn encode(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    pub fn graph(&self) -> &GraphProto {
        // `new` refuses a model without a graph.
        self.proto.graph.as_ref().expect("checked in Model::new")
    }

    fn initializers(&self) -> HashSet<&str> {
        let g = self.graph();
        g.initializer
            .iter()
            .map(|t| t.name.as_str())
            .chain(g.sparse_initializer.iter().filter_map(|s| s.values.as_ref().map(|v| v.name.as_str())))
            .collect()
    }

    /// The graph inputs that are fed at run time (initializers may be listed as inputs too).
    pub fn runtime_inputs(&self) -> Vec<&ValueInfoProto> {
        let init = self.initializers();
        self.graph().input.iter().filter(|i| !init.contains(i.name.as_str())).collect()
    }

    pub fn outputs(&self) -> Vec<&str> {
        self.graph().output.iter().map(|o| o.name.as_str()).collect()
    }

    /// Every tensor a node produces, in node order.
    pub fn intermediate_tensors(&self) -> Vec<&str> {
        self.graph().node.iter().flat_map(|n| n.output.iter()).filter(|t| !t.is_empty()).map(String::as_str).collect()
    }

    /// The type of a tensor, from the graph's inputs, outputs or value infos.
    pub fn value_info(&self, name: &str) -> Option<&ValueInfoProto> {
        let g = self.graph();
        g.input.iter().chain(&g.output).chain(&g.value_info).find(|v| v.name == name && v.r#type.is_some())
    }

    /// The valid cuts along the node order: for each k, the tensors made by the first k nodes (or
    /// fed as inputs) that a later node or the model's output still needs. The first is the
    /// cloud-only cut (the inputs), the last the edge-only cut (the outputs); repeats are dropped.
    pub fn cuts(&self) -> Vec<Vec<String>> {
        let g = self.graph();
        let init = self.initializers();
        let outputs: HashSet<&str> = self.outputs().into_iter().collect();
        // last_use[t] = index of the last node reading t (usize::MAX for a model output).
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, node) in g.node.iter().enumerate() {
            for t in node.input.iter().filter(|t| !t.is_empty()) {
                last_use.insert(t, i);
            }
        }
        for o in &outputs {
            last_use.insert(o, usize::MAX);
        }
        let mut live: Vec<&str> =
            self.runtime_inputs().into_iter().map(|v| v.name.as_str()).filter(|t| last_use.contains_key(t)).collect();
        let mut cuts: Vec<Vec<String>> = vec![live.iter().map(|s| s.to_string()).collect()];
        for (k, node) in g.node.iter().enumerate() {
            live.extend(node.output.iter().filter(|t| !t.is_empty() && !init.contains(t.as_str())).map(String::as_str));
            live.retain(|t| last_use.get(t).is_some_and(|&last| last > k));
            let cut: Vec<String> = live.iter().map(|s| s.to_string()).collect();
            if cuts.last() != Some(&cut) {
                cuts.push(cut);
            }
        }
        cuts
    }

    /// Splits the model at `cut`. Refused when the cut does not separate the inputs from the
    /// outputs (an output can be reached from an input without passing through it), or names a
    /// tensor the model does not have.
    pub fn partition(&self, cut: &[String]) -> Result<Partition, OnnxError> {
        let g = self.graph();
        let init = self.initializers();
        let inputs: Vec<&str> = self.runtime_inputs().into_iter().map(|v| v.name.as_str()).collect();
        let producer = producers(&g.node);
        if cut.is_empty() {
            return Err(OnnxError::BadCut("the cut names no tensor".into()));
        }
        let cut_set: HashSet<&str> = cut.iter().map(String::as_str).collect();
        if cut_set.len() != cut.len() {
            return Err(OnnxError::BadCut("the cut names a tensor twice".into()));
        }
        for t in cut {
            if !producer.contains_key(t.as_str()) && !inputs.contains(&t.as_str()) {
                return Err(OnnxError::BadCut(format!("the model has no tensor `{t}` (initializers cannot be cut)")));
            }
        }

        // The tail: everything the outputs need, back to the cut. Reaching an input means the cut
        // does not separate it from that output.
        let outputs = self.outputs();
        let mut tail: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<(&str, &str)> = outputs.iter().map(|o| (*o, *o)).collect();
        let mut visited: HashSet<&str> = HashSet::new();
        while let Some((t, output)) = stack.pop() {
            if cut_set.contains(t) || init.contains(t) || !visited.insert(t) {
                continue;
            }
            match producer.get(t) {
                Some(&i) => {
                    tail.insert(i);
                    stack.extend(g.node[i].input.iter().filter(|x| !x.is_empty()).map(|x| (x.as_str(), output)));
                }
                None if inputs.contains(&t) => {
                    return Err(OnnxError::BadCut(format!(
                        "the cut does not separate input `{t}` from output `{output}`: a path from one to the other passes no cut tensor"
                    )))
                }
                None => return Err(OnnxError::Invalid(format!("tensor `{t}` has no producer"))),
            }
        }
        // The head: everything the cut needs, back to the inputs.
        let mut head: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<&str> = cut.iter().map(String::as_str).collect();
        let mut visited: HashSet<&str> = HashSet::new();
        while let Some(t) = stack.pop() {
            if init.contains(t) || inputs.contains(&t) || !visited.insert(t) {
                continue;
            }
            if let Some(&i) = producer.get(t) {
                head.insert(i);
                stack.extend(g.node[i].input.iter().filter(|x| !x.is_empty()).map(String::as_str));
            }
        }
        // A cut tensor no output depends on would be computed for nothing.
        let tail_reads: HashSet<&str> = tail
            .iter()
            .flat_map(|&i| g.node[i].input.iter().map(String::as_str))
            .chain(outputs.iter().copied())
            .collect();
        if let Some(unused) = cut.iter().find(|t| !tail_reads.contains(t.as_str())) {
            return Err(OnnxError::BadCut(format!("no output depends on cut tensor `{unused}`")));
        }

        let passthrough: Vec<String> = cut.iter().filter(|t| inputs.contains(&t.as_str())).cloned().collect();
        let computed: Vec<&String> = cut.iter().filter(|t| !inputs.contains(&t.as_str())).collect();
        let head_model = if computed.is_empty() {
            None
        } else {
            let outs = computed.iter().map(|t| self.typed(t)).collect::<Result<Vec<_>, _>>()?;
            Some(self.submodel("head", &head, |name| inputs.contains(&name), outs))
        };
        let tail_model = if tail.is_empty() {
            None
        } else {
            let ins: Vec<ValueInfoProto> = cut.iter().map(|t| self.typed(t)).collect::<Result<_, _>>()?;
            let outs: Vec<ValueInfoProto> = g.output.to_vec();
            let mut m = self.submodel("tail", &tail, |_| false, outs);
            if let Some(graph) = m.graph.as_mut() {
                graph.input = ins;
            }
            Some(m)
        };
        let names = |set: &BTreeSet<usize>| set.iter().map(|&i| g.node[i].name.clone()).collect();
        Ok(Partition {
            head: head_model,
            tail: tail_model,
            head_nodes: names(&head),
            tail_nodes: names(&tail),
            passthrough,
        })
    }

    fn typed(&self, tensor: &str) -> Result<ValueInfoProto, OnnxError> {
        self.value_info(tensor).cloned().ok_or_else(|| OnnxError::NoType(tensor.to_string()))
    }

    /// A model of the given nodes (in the original order), the graph inputs `keep_input` selects,
    /// the initializers those nodes read, and `outputs`.
    fn submodel(
        &self,
        suffix: &str,
        nodes: &BTreeSet<usize>,
        keep_input: impl Fn(&str) -> bool,
        outputs: Vec<ValueInfoProto>,
    ) -> ModelProto {
        let g = self.graph();
        let node: Vec<_> = nodes.iter().map(|&i| g.node[i].clone()).collect();
        let reads: HashSet<&str> =
            node.iter().flat_map(|n| n.input.iter().map(String::as_str)).chain(subgraph_reads(&node)).collect();
        let made: HashSet<&str> = node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
        let graph = GraphProto {
            name: format!("{}_{suffix}", g.name),
            input: g.input.iter().filter(|i| keep_input(&i.name) && reads.contains(i.name.as_str())).cloned().collect(),
            initializer: g.initializer.iter().filter(|t| reads.contains(t.name.as_str())).cloned().collect(),
            sparse_initializer: g
                .sparse_initializer
                .iter()
                .filter(|s| s.values.as_ref().is_some_and(|v| reads.contains(v.name.as_str())))
                .cloned()
                .collect(),
            value_info: g
                .value_info
                .iter()
                .filter(|v| reads.contains(v.name.as_str()) || made.contains(v.name.as_str()))
                .cloned()
                .collect(),
            output: outputs,
            node,
            doc_string: g.doc_string.clone(),
            quantization_annotation: g.quantization_annotation.clone(),
            metadata_props: g.metadata_props.clone(),
        };
        ModelProto { graph: Some(graph), training_info: Vec::new(), ..self.proto.clone() }
    }

    /// Records tensor types (e.g. measured by running the model) as value infos, so that any
    /// tensor can become an input or output of a half.
    pub fn annotate(&mut self, types: impl IntoIterator<Item = ValueInfoProto>) {
        let known: HashSet<String> = {
            let g = self.graph();
            g.input.iter().chain(&g.output).chain(&g.value_info).map(|v| v.name.clone()).collect()
        };
        if let Some(g) = self.proto.graph.as_mut() {
            g.value_info.extend(types.into_iter().filter(|v| !known.contains(&v.name)));
        }
    }

    /// The same model with every intermediate tensor also an output (untyped), for measuring
    /// their shapes and sizes in one run.
    pub fn with_all_outputs(&self) -> ModelProto {
        let mut proto = self.proto.clone();
        if let Some(g) = proto.graph.as_mut() {
            let existing: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
            let extra: Vec<ValueInfoProto> = self
                .intermediate_tensors()
                .into_iter()
                .filter(|t| !existing.contains(*t))
                .map(|t| {
                    self.value_info(t)
                        .cloned()
                        .unwrap_or_else(|| ValueInfoProto { name: t.into(), ..Default::default() })
                })
                .collect();
            g.output.extend(extra);
        }
        proto
    }
}

/// Names read inside control-flow subgraphs (If/Loop/Scan bodies) from the enclosing scope.
fn subgraph_reads(nodes: &[crate::proto::NodeProto]) -> Vec<&str> {
    let mut out = Vec::new();
    for n in nodes {
        for a in &n.attribute {
            for g in a.g.iter().map(|b| b.as_ref()).chain(a.graphs.iter()) {
                out.extend(g.node.iter().flat_map(|n| n.input.iter().map(String::as_str)));
                out.extend(subgraph_reads(&g.node));
            }
        }
    }
    out
}

/// The index of the node that produces each tensor.
fn producers(nodes: &[crate::proto::NodeProto]) -> HashMap<&str, usize> {
    nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().filter(|t| !t.is_empty()).map(move |t| (t.as_str(), i)))
        .collect()
}

/// Orders the nodes so each comes after the producers of its inputs (Kahn's algorithm, stable:
/// a model already in order is left as it is).
fn sort_topologically(graph: &mut GraphProto) -> Result<(), OnnxError> {
    let n = graph.node.len();
    let producer = producers(&graph.node);
    let mut pending = vec![0usize; n];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in graph.node.iter().enumerate() {
        let deps: BTreeSet<usize> = node.input.iter().filter_map(|t| producer.get(t.as_str()).copied()).collect();
        for d in deps {
            if d == i {
                return Err(OnnxError::Invalid(format!("node `{}` reads its own output", node.name)));
            }
            pending[i] += 1;
            consumers[d].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &c in &consumers[i] {
            pending[c] -= 1;
            if pending[c] == 0 {
                ready.insert(c);
            }
        }
    }
    if order.len() != n {
        return Err(OnnxError::Invalid("the graph has a cycle".into()));
    }
    if order.iter().enumerate().any(|(k, &i)| k != i) {
        let mut nodes: Vec<Option<_>> = std::mem::take(&mut graph.node).into_iter().map(Some).collect();
        graph.node = order.into_iter().filter_map(|i| nodes[i].take()).collect();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{data_type, Dim, NodeProto, OperatorSetIdProto, TensorProto};

    #[test]
    fn a_graph_past_the_node_cap_is_refused_naming_it() {
        let chain = |n: usize| GraphProto {
            node: (0..n).map(|i| NodeProto::new("Relu", "", &[&format!("t{i}")], &[&format!("t{}", i + 1)])).collect(),
            ..Default::default()
        };
        let model = |n| ModelProto { graph: Some(chain(n)), ..Default::default() };
        assert!(Model::new(model(MAX_NODES)).is_ok());
        let e = Model::new(model(MAX_NODES + 1)).expect_err("past the cap").to_string();
        assert_eq!(e, "invalid graph: 100001 nodes; a model may have at most 100000");
    }

    /// x -> a = Relu(x) -> b = Neg(a); c = Add(a, b) (a residual block); y = Mul(c, w).
    fn residual() -> Model {
        let t = |n: &str| ValueInfoProto::tensor(n, data_type::FLOAT, &[Dim::Symbolic("N".into()), Dim::Fixed(4)]);
        let graph = GraphProto {
            name: "res".into(),
            // Out of order on purpose: decoding sorts them.
            node: vec![
                NodeProto::new("Mul", "", &["c", "w"], &["y"]),
                NodeProto::new("Relu", "", &["x"], &["a"]),
                NodeProto::new("Neg", "neg", &["a"], &["b"]),
                NodeProto::new("Add", "add", &["a", "b"], &["c"]),
            ],
            input: vec![t("x")],
            output: vec![t("y")],
            value_info: vec![t("a"), t("b"), t("c")],
            initializer: vec![TensorProto::f32("w", &[4], &[1.0, 2.0, 3.0, 4.0])],
            ..Default::default()
        };
        let proto = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(graph),
            ..Default::default()
        };
        Model::decode(&proto.encode_to_vec()).expect("valid model")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nodes_are_sorted_and_named() {
        let m = residual();
        let names: Vec<&str> = m.graph().node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["Relu_0", "neg", "add", "Mul_3"]);
    }

    #[test]
    fn cuts_follow_the_node_order_and_keep_both_branches_of_a_residual_block() {
        let cuts = residual().cuts();
        assert_eq!(
            cuts,
            vec![strings(&["x"]), strings(&["a"]), strings(&["a", "b"]), strings(&["c"]), strings(&["y"])]
        );
    }

    #[test]
    fn one_branch_of_a_residual_block_is_refused() {
        let err = residual().partition(&strings(&["b"])).expect_err("b alone does not separate x from y");
        assert_eq!(
            err.to_string(),
            "invalid cut: the cut does not separate input `x` from output `y`: a path from one to the other passes no cut tensor"
        );
        let err = residual().partition(&strings(&["w"])).expect_err("an initializer");
        assert!(err.to_string().contains("no tensor `w`"), "{err}");
        let err = residual().partition(&strings(&["c", "a"])).expect_err("a is not needed past c");
        assert!(err.to_string().contains("no output depends on cut tensor `a`"), "{err}");
    }

    #[test]
    fn partition_writes_both_halves() {
        let m = residual();
        let p = m.partition(&strings(&["a", "b"])).expect("valid cut");
        assert_eq!(p.head_nodes, ["Relu_0", "neg"]);
        assert_eq!(p.tail_nodes, ["add", "Mul_3"]);
        let head = p.head.expect("head").graph.expect("graph");
        assert_eq!(head.input.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["x"]);
        assert_eq!(head.output.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(head.initializer.is_empty());
        let tail = p.tail.expect("tail").graph.expect("graph");
        assert_eq!(tail.input.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(tail.initializer.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["w"]);
        assert_eq!(tail.output[0].name, "y");

        let cloud_only = m.partition(&strings(&["x"])).expect("the inputs are a cut");
        assert!(cloud_only.head.is_none());
        assert_eq!(cloud_only.passthrough, ["x"]);
        let edge_only = m.partition(&strings(&["y"])).expect("the outputs are a cut");
        assert!(edge_only.tail.is_none());
        assert_eq!(edge_only.head_nodes.len(), 4);
    }

    #[test]
    fn an_untyped_cut_tensor_is_named() {
        let mut proto = residual().into_proto();
        if let Some(g) = proto.graph.as_mut() {
            g.value_info.clear();
        }
        let m = Model::new(proto).expect("valid");
        let err = m.partition(&strings(&["c"])).expect_err("c has no type");
        assert_eq!(err, OnnxError::NoType("c".into()));
        let mut m = m;
        m.annotate([ValueInfoProto::tensor("c", data_type::FLOAT, &[Dim::Fixed(1), Dim::Fixed(4)])]);
        m.partition(&strings(&["c"])).expect("typed now");
    }

    #[test]
    fn a_model_survives_a_round_trip_byte_for_byte() {
        let bytes = residual().encode();
        assert_eq!(Model::decode(&bytes).expect("decodes").encode(), bytes);
    }

    #[test]
    fn every_intermediate_tensor_can_be_an_output() {
        let all = residual().with_all_outputs();
        let names: Vec<String> = all.graph.expect("graph").output.into_iter().map(|o| o.name).collect();
        assert_eq!(names, ["y", "a", "b", "c"]);
    }
}
