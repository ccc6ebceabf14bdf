//! Training needs gradients through every op: each trainable parameter of each model receives a
//! finite, non-zero gradient, and the hand-written ops agree with finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use vidit::models::umt5::{Umt5Config, Umt5EncoderModel};
use vidit::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use vidit::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    vidit::noise::randn(seed, shape, &Device::Cpu).unwrap()
}

/// Asserts that every variable in `varmap` got a finite gradient with some non-zero entry.
fn assert_all_parameters_learn(varmap: &VarMap, loss: &Tensor, model: &str) -> Result<()> {
    let grads = loss.backward()?;
    let vars = varmap.data().lock().unwrap();
    assert!(!vars.is_empty());
    let mut missing = Vec::new();
    for (name, var) in vars.iter() {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                if g.iter().any(|v| !v.is_finite()) {
                    missing.push(format!("{name}: non-finite gradient"));
                } else if g.iter().all(|v| *v == 0.0) {
                    missing.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
    eprintln!("{model}: {} parameters checked", vars.len());
    assert!(missing.is_empty(), "{model}: {missing:#?}");
    Ok(())
}

/// The training forward must read the parameters themselves: a weight copied or transformed
/// once at construction would get gradients but stay at its initial value in the forward, while
/// the optimiser moves the parameter (and the exported model then matches nothing). After every
/// parameter is changed in place, the same module must compute what a module built afresh from
/// the new values computes.
fn assert_forward_follows_parameters<M>(
    varmap: &VarMap,
    module: &M,
    build: impl Fn(VarBuilder) -> Result<M>,
    run: impl Fn(&M) -> Result<Tensor>,
    model: &str,
) -> Result<()> {
    let before = run(module)?;
    let mut values = std::collections::HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let moved = (var.as_tensor() * 1.1)?.affine(1.0, 0.01)?;
        var.set(&moved)?;
        values.insert(name.clone(), moved);
    }
    let after = run(module)?;
    let fresh = run(&build(VarBuilder::from_tensors(values, DType::F32, &Device::Cpu))?)?;
    let diff =
        |a: &Tensor, b: &Tensor| -> Result<f32> { Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?) };
    assert!(diff(&after, &before)? > 1e-3, "{model}: changing the parameters changed nothing");
    let stale = diff(&after, &fresh)?;
    assert!(stale <= 1e-4, "{model}: the forward uses stale copies of parameters ({stale})");
    Ok(())
}

fn small_transformer(vb: VarBuilder) -> Result<WanTransformer3DModel> {
    let config = WanTransformerConfig {
        num_attention_heads: 2,
        attention_head_dim: 16,
        in_channels: 4,
        out_channels: 4,
        text_dim: 12,
        freq_dim: 16,
        ffn_dim: 48,
        num_layers: 2,
        ..Default::default()
    };
    WanTransformer3DModel::new(config, vb)
}

fn run_transformer(model: &WanTransformer3DModel) -> Result<Tensor> {
    let context = model.text_context(&randn(1, &[2, 5, 12]))?;
    model.forward(&randn(2, &[2, 4, 2, 4, 6]), &Tensor::new(&[500f32, 20.0], &Device::Cpu)?, &context)
}

#[test]
fn every_transformer_parameter_gets_a_gradient() -> Result<()> {
    let varmap = VarMap::new();
    let model = small_transformer(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let loss = (run_transformer(&model)? - randn(3, &[2, 4, 2, 4, 6]))?.sqr()?.mean_all()?;
    assert_all_parameters_learn(&varmap, &loss, "transformer")?;
    assert_forward_follows_parameters(&varmap, &model, small_transformer, run_transformer, "transformer")
}

fn small_vae(vb: VarBuilder) -> Result<AutoencoderKLWan> {
    let config = WanVaeConfig {
        base_dim: 4,
        z_dim: 4,
        dim_mult: vec![1, 2, 2],
        num_res_blocks: 1,
        temperal_downsample: vec![true, false],
        scale_factor_spatial: Some(4),
        scale_factor_temporal: Some(2),
        latents_mean: vec![0.0; 4],
        latents_std: vec![1.0; 4],
        ..Default::default()
    };
    AutoencoderKLWan::new(config, vb)
}

#[test]
fn every_vae_parameter_gets_a_gradient() -> Result<()> {
    let varmap = VarMap::new();
    let vae = small_vae(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let video = randn(4, &[1, 3, 5, 16, 16]).tanh()?;
    let posterior = vae.encode(&video)?;
    let recon = vae.decode(&posterior.mean)?;
    let kl =
        (posterior.mean.sqr()? + posterior.logvar.exp()? - posterior.logvar.affine(1.0, 1.0)?)?.mean_all()?;
    let loss = ((recon - &video)?.sqr()?.mean_all()? + kl)?;
    assert_all_parameters_learn(&varmap, &loss, "vae")?;
    let run = |vae: &AutoencoderKLWan| -> Result<Tensor> { vae.decode_unclamped(&vae.encode(&video)?.mean) };
    assert_forward_follows_parameters(&varmap, &vae, small_vae, run, "vae")
}

fn small_text_encoder(vb: VarBuilder) -> Result<Umt5EncoderModel> {
    let config = Umt5Config {
        vocab_size: 20,
        d_model: 16,
        d_kv: 4,
        d_ff: 24,
        num_layers: 2,
        num_heads: 4,
        ..Default::default()
    };
    Umt5EncoderModel::new(config, vb)
}

#[test]
fn every_text_encoder_parameter_gets_a_gradient() -> Result<()> {
    let varmap = VarMap::new();
    let model = small_text_encoder(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    // Every vocabulary entry appears, so every embedding row can learn.
    let ids = Tensor::arange(0u32, 20, &Device::Cpu)?.reshape((2, 10))?;
    let mask = Tensor::ones((2, 10), DType::U32, &Device::Cpu)?;
    let run = |model: &Umt5EncoderModel| -> Result<Tensor> { model.forward(&ids, &mask) };
    let loss = (run(&model)? - randn(5, &[2, 10, 16]))?.sqr()?.mean_all()?;
    assert_all_parameters_learn(&varmap, &loss, "text encoder")?;
    assert_forward_follows_parameters(&varmap, &model, small_text_encoder, run, "text encoder")
}

/// Compares d loss / d x from autograd with central differences at a few entries.
fn check_gradient(name: &str, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let var = Var::from_tensor(x)?;
    let weights = randn(99, x.dims()); // a random projection makes every output count
    let loss = |t: &Tensor| -> Result<f32> {
        let y = f(t)?;
        let w = weights.flatten_all()?.narrow(0, 0, y.elem_count().min(weights.elem_count()))?;
        Ok((y.flatten_all()?.narrow(0, 0, w.elem_count())? * w)?.sum_all()?.to_scalar::<f32>()?)
    };
    let y = f(var.as_tensor())?;
    let w = weights.flatten_all()?.narrow(0, 0, y.elem_count().min(weights.elem_count()))?;
    let grads = (y.flatten_all()?.narrow(0, 0, w.elem_count())? * w)?.sum_all()?.backward()?;
    let analytic = grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
    let base = x.flatten_all()?.to_vec1::<f32>()?;
    let n = base.len();
    let eps = 1e-2f32;
    for k in [0, n / 3, n / 2, n - 1] {
        let mut plus = base.clone();
        plus[k] += eps;
        let mut minus = base.clone();
        minus[k] -= eps;
        let plus = Tensor::from_vec(plus, x.dims(), x.device())?;
        let minus = Tensor::from_vec(minus, x.dims(), x.device())?;
        let numeric = (loss(&plus)? - loss(&minus)?) / (2.0 * eps);
        let err = (numeric - analytic[k]).abs();
        let scale = numeric.abs().max(analytic[k].abs()).max(1e-2);
        assert!(err / scale < 2e-2, "{name}[{k}]: autograd {} vs finite difference {numeric}", analytic[k]);
    }
    Ok(())
}

#[test]
fn custom_ops_match_finite_differences() -> Result<()> {
    use std::collections::HashMap;
    use vidit::models::layers::{attention::sdpa, conv3d::CausalConv3d, norm};
    let dev = Device::Cpu;
    let x = randn(10, &[2, 3, 8]);
    let vb = VarBuilder::from_tensors(
        HashMap::from([
            ("weight".into(), randn(11, &[8]).affine(0.3, 1.0)?),
            ("bias".into(), randn(12, &[8])),
        ]),
        DType::F32,
        &dev,
    );
    let layer_norm = norm::LayerNorm::affine(8, 1e-6, vb.clone())?;
    check_gradient("layer norm", &x, |t| layer_norm.forward(t))?;
    let rms_norm = norm::RmsNorm::new(8, 1e-6, vb)?;
    check_gradient("rms norm", &x, |t| rms_norm.forward(t))?;

    let q = randn(13, &[1, 2, 5, 4]);
    let k = randn(14, &[1, 2, 7, 4]);
    let v = randn(15, &[1, 2, 7, 4]);
    let bias = randn(16, &[1, 2, 5, 7]);
    check_gradient("attention wrt q", &q, |t| sdpa(t, &k, &v, 0.5, Some(&bias)))?;
    check_gradient("attention wrt k", &k, |t| sdpa(&q, t, &v, 0.5, Some(&bias)))?;
    check_gradient("attention wrt v", &v, |t| sdpa(&q, &k, t, 0.5, None))?;

    // The fused CPU kernels (vidit::kernels), token-major (B, L, H, D).
    use vidit::kernels;
    use vidit::kernels::linear::WeightLayout;
    let (qt, kt, vt) = (
        q.transpose(1, 2)?.contiguous()?,
        k.transpose(1, 2)?.contiguous()?,
        v.transpose(1, 2)?.contiguous()?,
    );
    check_gradient("fused attention wrt q", &qt, |t| kernels::attention::attention(t, &kt, &vt, 0.5))?;
    check_gradient("fused attention wrt k", &kt, |t| kernels::attention::attention(&qt, t, &vt, 0.5))?;
    check_gradient("fused attention wrt v", &vt, |t| kernels::attention::attention(&qt, &kt, t, 0.5))?;
    check_gradient("fused gelu", &x, kernels::gelu::gelu)?;
    let (w, b) = (randn(21, &[5, 8]), randn(22, &[5]));
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let w = match layout {
            WeightLayout::OutIn => w.clone(),
            WeightLayout::InOut => w.t()?.contiguous()?,
        };
        check_gradient("fused linear wrt x", &x, |t| kernels::linear::linear(t, &w, Some(&b), layout))?;
        check_gradient("fused linear wrt weight", &w, |t| kernels::linear::linear(&x, t, Some(&b), layout))?;
        check_gradient("fused linear wrt bias", &b, |t| kernels::linear::linear(&x, &w, Some(t), layout))?;
    }
    let (cos, sin) = (randn(23, &[5, 2]).cos()?, randn(23, &[5, 2]).sin()?);
    check_gradient("fused rope", &qt, |t| kernels::rope::rope(t, &cos, &sin))?;

    let vb = VarBuilder::from_tensors(
        HashMap::from([
            ("weight".into(), randn(17, &[3, 2, 3, 3, 3]).affine(0.3, 0.0)?),
            ("bias".into(), randn(18, &[3])),
        ]),
        DType::F32,
        &dev,
    );
    let conv = CausalConv3d::new(2, 3, (3, 3, 3), 1, (1, 1, 1), vb)?;
    let video = randn(19, &[1, 2, 4, 5, 5]);
    check_gradient("causal conv3d", &video, |t| conv.forward(t, None))?;
    check_gradient("causal conv3d with cache", &video, |t| {
        conv.forward(&t.narrow(2, 2, 2)?, Some(&t.narrow(2, 0, 2)?))
    })?;
    // Softmax's composed form, used under autograd, equals the fused one used at inference.
    let s = randn(20, &[3, 9]);
    let composed = candle_nn::ops::softmax(&Var::from_tensor(&s)?.as_tensor().clone(), D::Minus1)?;
    let fused = candle_nn::ops::softmax_last_dim(&s)?;
    assert!((composed - fused)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
    Ok(())
}
