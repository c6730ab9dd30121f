//! An output folder written beside its destination and renamed into place, so the
//! destination is never half written and a replaced one is swapped whole: what `prepare`
//! and `export` write.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The hidden sibling `.<name>.partial` a folder for `out` is written into, emptied of
/// anything an interrupted run left there.
pub fn start(out: &Path) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing the interrupted {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// Move the finished `tmp` to `out`, replacing what is there (the caller has checked it
/// may be replaced).
pub fn finish(tmp: &Path, out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let old = tmp.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        std::fs::rename(tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}

/// The names in folder `dir`.
pub fn file_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", dir.display()))
}
