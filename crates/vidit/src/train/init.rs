//! Starting a model from trained weights (fine-tuning), whole or in part: the tensors chosen to
//! train become variables holding their given values, the rest stay constants, so the optimiser
//! (and weight decay) never touches them.

use crate::error::input_error;
use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Trained weights (named as the model asks for them) to build a model over; `trainable` picks
/// the tensors that become variables of `varmap`.
#[derive(Clone)]
pub struct StartFrom {
    /// Where the weights come from, for messages.
    source: String,
    weights: Arc<HashMap<String, Tensor>>,
    varmap: VarMap,
    trainable: fn(&str) -> bool,
    used: Arc<Mutex<HashSet<String>>>,
}

impl StartFrom {
    pub fn new(
        source: impl Into<String>,
        weights: HashMap<String, Tensor>,
        varmap: &VarMap,
        trainable: fn(&str) -> bool,
    ) -> Self {
        Self {
            source: source.into(),
            weights: Arc::new(weights),
            varmap: varmap.clone(),
            trainable,
            used: Default::default(),
        }
    }

    /// Builds the model with `build` over these weights. A tensor the model asks for that the
    /// weights lack or hold in another shape, or one it never asks for (weights of another
    /// config), is the user's error, naming the source and the tensor.
    pub fn build<M>(&self, device: &Device, build: impl FnOnce(VarBuilder) -> Result<M>) -> Result<M> {
        let vb = VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone());
        let model = build(vb).map_err(|e| input_error(format!("{}: {e}", self.source)))?;
        let used = self.used.lock().expect("lock").len();
        if used != self.weights.len() {
            return Err(input_error(format!(
                "{}: {} tensors for a model of {used}: another config's weights",
                self.source,
                self.weights.len()
            )));
        }
        Ok(model)
    }
}

/// A model's freshly initialised weights (its constructor's own initialisation) as plain tensors,
/// named as `build` asks for them: random weights to keep fixed or to write out.
pub fn fresh_weights<M>(
    device: &Device,
    build: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let vars = varmap.data().lock().expect("varmap lock");
    Ok(vars.iter().map(|(name, var)| (name.clone(), var.as_tensor().detach())).collect())
}

impl SimpleBackend for StartFrom {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let value = self.get_unchecked(name, dtype, dev)?;
        if value.shape() != &shape {
            candle_core::bail!("{name} is {:?}, the config makes it {:?}", value.dims(), shape.dims());
        }
        if !(self.trainable)(name) {
            return Ok(value);
        }
        let mut vars = self.varmap.data().lock().expect("varmap lock");
        let var = match vars.entry(name.to_string()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e.insert(Var::from_tensor(&value)?).clone(),
        };
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(value) = self.weights.get(name) else { candle_core::bail!("no tensor {name}") };
        self.used.lock().expect("lock").insert(name.to_string());
        value.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::{Linear, Module};

    fn weights() -> Result<HashMap<String, Tensor>> {
        let t = |v: f32| Tensor::new(&[[v]], &Device::Cpu);
        Ok(HashMap::from([
            ("frozen.weight".to_string(), t(2.0)?),
            ("frozen.bias".to_string(), t(1.0)?.squeeze(0)?),
            ("tuned.weight".to_string(), t(3.0)?),
            ("tuned.bias".to_string(), t(0.5)?.squeeze(0)?),
        ]))
    }

    fn two_layers(vb: VarBuilder) -> Result<(Linear, Linear)> {
        Ok((candle_nn::linear(1, 1, vb.pp("frozen"))?, candle_nn::linear(1, 1, vb.pp("tuned"))?))
    }

    #[test]
    fn only_the_chosen_tensors_become_variables_and_all_keep_their_values() -> Result<()> {
        let varmap = VarMap::new();
        let start = StartFrom::new("w", weights()?, &varmap, |name| name.starts_with("tuned."));
        let (frozen, tuned) = start.build(&Device::Cpu, two_layers)?;
        let mut names: Vec<String> = varmap.data().lock().expect("lock").keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["tuned.bias", "tuned.weight"]);
        let x = Tensor::new(&[[1f32]], &Device::Cpu)?;
        let y = tuned.forward(&frozen.forward(&x)?)?; // 3 · (2 · 1 + 1) + 0.5
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [9.5]);
        let grads = y.sum_all()?.backward()?;
        assert!(varmap.all_vars().iter().all(|v| grads.get(v).is_some()));
        Ok(())
    }

    #[test]
    fn missing_misshapen_and_unused_tensors_are_the_users_errors() -> Result<()> {
        let start = |w| StartFrom::new("dir", w, &VarMap::new(), |_| true);
        let mut short = weights()?;
        short.remove("tuned.bias");
        let wide = |vb: VarBuilder| Ok(candle_nn::linear(1, 2, vb.pp("tuned"))?);
        let one = |vb: VarBuilder| Ok(candle_nn::linear(1, 1, vb.pp("tuned"))?);
        for (err, says) in [
            (start(short).build(&Device::Cpu, two_layers).err(), "dir: no tensor tuned.bias"),
            (start(weights()?).build(&Device::Cpu, wide).err(), "dir: tuned.weight is [1, 1]"),
            (start(weights()?).build(&Device::Cpu, one).err(), "dir: 4 tensors for a model of 2"),
        ] {
            let err = err.expect("refused");
            assert!(crate::error::is_input_error(&err) && err.to_string().contains(says), "{err}");
        }
        Ok(())
    }
}
