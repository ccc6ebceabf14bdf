//! The built-in model, compiled into the binary (see build.rs) and unpacked once into a cache
//! folder so it loads through the ordinary model-folder path.

use anyhow::Result;
use std::path::PathBuf;

#[cfg(vidit_builtin)]
mod files {
    include!(concat!(env!("OUT_DIR"), "/builtin_files.rs"));
}

/// The folder of the built-in model, unpacked on first use.
#[cfg(vidit_builtin)]
pub fn model_dir() -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (name, bytes) in files::FILES {
        name.hash(&mut hasher);
        bytes.hash(&mut hasher);
    }
    let dir = std::env::temp_dir().join(format!("vidit-shapes-{:016x}", hasher.finish()));
    if !dir.join("model_index.json").is_file() {
        let _ = std::fs::remove_dir_all(&dir);
        vidit::io::atomic::write_dir(&dir, |tmp| {
            for (name, bytes) in files::FILES {
                let path = tmp.join(name);
                std::fs::create_dir_all(path.parent().expect("file in a folder"))?;
                std::fs::write(path, bytes)?;
            }
            Ok(())
        })?;
    }
    Ok(dir)
}

#[cfg(not(vidit_builtin))]
pub fn model_dir() -> Result<PathBuf> {
    Err(vidit::error::input_error(
        "--model: required (this build has no built-in model: models/shapes/ was missing)",
    ))
}
