//! Packed bf16 weights owned by a layer.
use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId};

use crate::error::{Error, Result};

/// A layer's weight in the form the bf16 kernels read: made on first use, remade when the
/// weight tensor is replaced (a merged LoRA), shared by clones of the layer and freed with the
/// last of them.
pub(crate) struct PackedWeight<T>(Arc<Mutex<Option<(TensorId, Arc<T>)>>>);

impl<T> PackedWeight<T> {
    pub(crate) fn get(&self, weight: &Tensor, make: impl FnOnce(&Tensor) -> Result<T>) -> Result<Arc<T>> {
        let mut slot = self.0.lock().map_err(|_| Error::invalid("packed weight: a packing thread panicked"))?;
        if let Some((id, p)) = slot.as_ref() {
            if *id == weight.id() {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(make(weight)?);
        *slot = Some((weight.id(), p.clone()));
        Ok(p)
    }
}

impl<T> Clone for PackedWeight<T> {
    fn clone(&self) -> Self {
        PackedWeight(self.0.clone())
    }
}

impl<T> Default for PackedWeight<T> {
    fn default() -> Self {
        PackedWeight(Arc::new(Mutex::new(None)))
    }
}

impl<T> std::fmt::Debug for PackedWeight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self.0.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(f, "PackedWeight {{ packed: {packed} }}")
    }
}
