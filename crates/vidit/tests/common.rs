//! Shared helpers for the parity tests: fixture paths and tolerance checks.
#![allow(dead_code)]

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures` at the repository root, written by `tools/parity/make_fixtures.py`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tiny_wan() -> PathBuf {
    fixtures().join("tiny-wan")
}

pub fn load(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixtures().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("{}", path.display()))
}

pub fn get<'a>(record: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    record.get(key).unwrap_or_else(|| panic!("fixture has no tensor `{key}`"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Asserts `|a − b| ≤ tol` everywhere, printing the measured error.
pub fn assert_close(name: &str, got: &Tensor, expected: &Tensor, tol: f32) -> Result<()> {
    let err = max_abs_diff(got, expected)?;
    eprintln!("{name}: max abs error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{name}: max abs error {err:e} exceeds {tol:e}");
    Ok(())
}
