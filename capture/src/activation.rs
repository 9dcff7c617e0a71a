//! The activation functions of the MLPs, by their transformers names.

/// libtorch's `gelu` approximation (`"tanh"` or `"none"`) for a transformers activation name, or
/// `None` when the name is not a GELU we compute exactly as transformers does.
pub fn gelu_approximation(name: &str) -> Option<&'static str> {
    match name {
        // transformers' NewGELUActivation and PytorchGELUTanh: the tanh approximation.
        "gelu_new" | "gelu_pytorch_tanh" => Some("tanh"),
        "gelu" => Some("none"),
        _ => None,
    }
}
