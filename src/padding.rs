//! Which positions of a batch are padding. Classification batches hold sequences of
//! different lengths, padded to the longest; every mixer takes this mask and keeps padded
//! positions from influencing real ones, in both directions, whatever the padding holds.

use burn::prelude::*;

/// `valid` `[batch, seq]`: 1.0 at real positions, 0.0 at padding.
#[derive(Debug, Clone)]
pub struct Padding {
    pub valid: Tensor<2>,
}

impl Padding {
    /// Sequences of `lengths[i]` real positions followed by padding, to `seq_len`.
    pub fn from_lengths(lengths: &[usize], seq_len: usize, device: &Device) -> Self {
        let values: Vec<f32> = lengths
            .iter()
            .flat_map(|&n| (0..seq_len).map(move |t| if t < n { 1.0 } else { 0.0 }))
            .collect();
        Self {
            valid: Tensor::from_data(TensorData::new(values, [lengths.len(), seq_len]), device),
        }
    }

    /// The mask as `[batch, seq, 1]`, to multiply `[batch, seq, d]` activations by.
    pub fn column(&self) -> Tensor<3> {
        self.valid.clone().unsqueeze_dim(2)
    }

    /// `x` `[batch, seq, d]` with padded positions set to 0.
    pub fn zero_padded(&self, x: Tensor<3>) -> Tensor<3> {
        x * self.column()
    }

    /// `[batch, 1, 1, seq]`, true at padded keys: an attention mask over heads and queries.
    pub fn hidden_keys(&self) -> Tensor<4, Bool> {
        self.valid
            .clone()
            .lower_elem(0.5)
            .unsqueeze_dim::<3>(1)
            .unsqueeze_dim(1)
    }

    /// The mask of the sequence read backwards.
    pub fn reversed(&self) -> Self {
        Self {
            valid: self.valid.clone().flip([1]),
        }
    }

    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            valid: self.valid.clone().to_device(device),
        }
    }
}
