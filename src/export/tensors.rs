//! Named f32 tensors held in memory, read from and written to safetensors bytes: what
//! converting between metamix's and another library's layouts needs (renames, transposes,
//! concatenations) and nothing more.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self::new(shape, vec![0.0; n])
    }

    /// `[r, c]` → `[c, r]`.
    pub fn transposed(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self::new(vec![c, r], data)
    }

    /// Stack along the first axis (the others equal).
    pub fn cat_rows(parts: &[&Tensor]) -> Self {
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Self::new(shape, data)
    }

    /// Rows `start..start + n` (first axis).
    pub fn rows(&self, start: usize, n: usize) -> Self {
        let width: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = n;
        Self::new(
            shape,
            self.data[start * width..(start + n) * width].to_vec(),
        )
    }

    /// Rows reordered: row `i` of the result is row `order[i]` of `self`.
    pub fn gather_rows(&self, order: &[usize]) -> Self {
        let width: usize = self.shape[1..].iter().product();
        let data = order
            .iter()
            .flat_map(|&r| self.data[r * width..(r + 1) * width].iter().copied())
            .collect();
        Self::new(self.shape.clone(), data)
    }

    pub fn is_zero(&self) -> bool {
        self.data.iter().all(|&x| x == 0.0)
    }
}

/// Tensors by name, sorted.
pub type Tensors = BTreeMap<String, Tensor>;

/// Every tensor of a safetensors file's bytes, as f32 (F32, F16 and BF16 are read).
pub fn read(bytes: &[u8], origin: &str) -> anyhow::Result<Tensors> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{origin} is not a valid safetensors file"))?;
    let mut out = Tensors::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!("{origin}: tensor `{name}` is {other:?}; F32, F16 or BF16 are read"),
        };
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Safetensors bytes of `tensors` in f32 with `metadata` in the header.
pub fn write(tensors: &Tensors, metadata: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n,
                t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                &t.shape,
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| Ok(((*n).clone(), TensorView::new(Dtype::F32, s.to_vec(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(safetensors::serialize(views, Some(meta))?)
}
