//! A dense f32 tensor: the working form of every weight during math.

/// Row-major f32 data with its shape. Scalars have an empty shape and one element.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Rows of the 2-D view `[shape[0], rest]` used by every weight matrix (conv kernels flatten
    /// their input and spatial dims into columns, as kohya and LyCORIS do).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    pub fn cols(&self) -> usize {
        self.numel() / self.rows().max(1)
    }

    pub fn reshaped(mut self, shape: Vec<usize>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), self.data.len());
        self.shape = shape;
        self
    }

    pub fn scale(mut self, s: f32) -> Tensor {
        if s != 1.0 {
            self.data.iter_mut().for_each(|v| *v *= s);
        }
        self
    }

    pub fn frobenius_norm(&self) -> f64 {
        self.data
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt()
    }

    pub fn has_non_finite(&self) -> bool {
        self.data.iter().any(|v| !v.is_finite())
    }

    /// ‖self − other‖ / ‖other‖, the measure every parity test uses.
    pub fn relative_error(&self, reference: &Tensor) -> f64 {
        assert_eq!(self.data.len(), reference.data.len(), "shape mismatch");
        let diff: f64 = self
            .data
            .iter()
            .zip(&reference.data)
            .map(|(a, b)| {
                let d = *a as f64 - *b as f64;
                d * d
            })
            .sum();
        let norm = reference.frobenius_norm();
        if norm == 0.0 {
            diff.sqrt()
        } else {
            diff.sqrt() / norm
        }
    }
}
