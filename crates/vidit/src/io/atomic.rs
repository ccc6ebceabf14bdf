//! Write to a temporary sibling, then rename into place.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name =
        path.file_name().with_context(|| format!("{}: not a file path", path.display()))?.to_string_lossy();
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.{}.tmp", std::process::id())))
}

/// Writes a file by calling `write` on a temporary path next to `path`, then renaming it.
/// On error the temporary file is removed and `path` is untouched.
pub fn write_file(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path)?;
    let result = write(&tmp).and_then(|()| {
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a folder by filling a temporary sibling folder, then renaming it onto `path`
/// (which must not exist or be empty).
pub fn write_dir(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let path = path.components().as_path();
    let tmp = temp_sibling(path)?;
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let result = write(&tmp).and_then(|()| {
        if path.is_dir() {
            fs::remove_dir(path)
                .with_context(|| format!("{}: folder exists and is not empty", path.display()))?;
        }
        fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("out.bin");
        let err = write_file(&path, |tmp| {
            fs::write(tmp, b"partial")?;
            anyhow::bail!("crash in the middle")
        });
        assert!(err.is_err());
        assert_eq!(fs::read_dir(dir.path())?.count(), 0);
        write_file(&path, |tmp| Ok(fs::write(tmp, b"whole")?))?;
        assert_eq!(fs::read(&path)?, b"whole");
        Ok(())
    }

    #[test]
    fn dir_written_whole_or_not_at_all() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("frames");
        assert!(write_dir(&out, |tmp| {
            fs::write(tmp.join("a"), b"1")?;
            anyhow::bail!("crash")
        })
        .is_err());
        assert_eq!(fs::read_dir(dir.path())?.count(), 0);
        write_dir(&out, |tmp| Ok(fs::write(tmp.join("a"), b"1")?))?;
        assert_eq!(fs::read(out.join("a"))?, b"1");
        Ok(())
    }
}
