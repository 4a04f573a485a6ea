//! The seven projections of a decoder layer and their shapes.

use super::config::ModelConfig;

/// The seven projections of a decoder layer (the places a LoRA adapter may attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl Proj {
    /// Every projection, in layer order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module name Hugging Face uses (`q_proj`, …).
    pub fn module_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// `(out_features, in_features)` of this projection for a model config.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        match self {
            Proj::Q => (q, cfg.hidden_size),
            Proj::K | Proj::V => (kv, cfg.hidden_size),
            Proj::O => (cfg.hidden_size, q),
            Proj::Gate | Proj::Up => (cfg.intermediate_size, cfg.hidden_size),
            Proj::Down => (cfg.hidden_size, cfg.intermediate_size),
        }
    }

    /// The weight's tensor name in layer `layer`.
    pub fn tensor_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}.weight", self.parent(), self.module_name())
    }
}
