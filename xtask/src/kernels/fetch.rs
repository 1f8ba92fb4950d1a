//! Downloading, checking and unpacking the pinned packages, cached across runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::pins::{Deb, Series};
use crate::{output, run, step};

/// Where downloads and unpacked kernels are kept (`VMATRACE_KERNEL_CACHE` to move it).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VMATRACE_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/vmatrace-kernels"))
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Downloads `url` to `to` (via a temporary file).
fn download(url: &str, to: &Path) -> Result<bool> {
    let tmp = to.with_extension("part");
    let status = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "--connect-timeout", "20", "-o"])
        .arg(&tmp)
        .arg(url)
        .status()
        .context("running curl")?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(false);
    }
    std::fs::rename(&tmp, to)?;
    Ok(true)
}

/// The `.deb` of `deb`, downloaded and checked (or taken from the cache). `None` when the
/// archive no longer has it.
pub fn fetch_deb(deb: &Deb) -> Result<Option<PathBuf>> {
    let dir = cache_dir().join("debs");
    std::fs::create_dir_all(&dir)?;
    let name = deb.filename.rsplit('/').next().unwrap_or(&deb.filename);
    let path = dir.join(name);
    if path.exists() && sha256(&path)? == deb.sha256 {
        return Ok(Some(path));
    }
    let url = format!("{}/{}", deb.archive, deb.filename);
    step(&format!("downloading {} {}", deb.package, deb.version));
    if !download(&url, &path)? {
        return Ok(None);
    }
    let got = sha256(&path)?;
    if got != deb.sha256 {
        let _ = std::fs::remove_file(&path);
        bail!("{url}: SHA-256 {got}, expected {}", deb.sha256);
    }
    Ok(Some(path))
}

/// One stanza of a `Packages` index.
#[derive(Debug, Default)]
struct Stanza {
    package: String,
    version: String,
    filename: String,
    sha256: String,
    depends: String,
}

fn stanzas(text: &str) -> Vec<Stanza> {
    text.split("\n\n")
        .map(|block| {
            let mut s = Stanza::default();
            for line in block.lines() {
                let Some((k, v)) = line.split_once(": ") else {
                    continue;
                };
                match k {
                    "Package" => s.package = v.into(),
                    "Version" => s.version = v.into(),
                    "Filename" => s.filename = v.into(),
                    "SHA256" => s.sha256 = v.into(),
                    "Depends" => s.depends = v.into(),
                    _ => {}
                }
            }
            s
        })
        .filter(|s| !s.package.is_empty())
        .collect()
}

/// Whether Debian version `a` is newer than `b`.
fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// The newest packages of `series` in its suite's index: the image package, or, where it is
/// only a shell (7.x), the `linux-binary-*`, `linux-base-*` and `linux-modules-*` it depends
/// on.
pub fn newest_of(series: &Series, arch: &str) -> Result<Vec<Deb>> {
    let url = format!(
        "{}/dists/{}/main/binary-{arch}/Packages.xz",
        series.archive, series.suite
    );
    let dir = cache_dir().join("index");
    std::fs::create_dir_all(&dir)?;
    let xz = dir.join(format!("{}-{arch}.Packages.xz", series.suite));
    if !download(&url, &xz)? {
        bail!("cannot download {url}");
    }
    let text = output(Command::new("xz").arg("-dc").arg(&xz))?;
    let all = stanzas(&text);
    let matches = |p: &str| {
        p.starts_with(series.prefix)
            && p.ends_with(series.suffix)
            && !p.ends_with("-unsigned")
            && !p.contains("-dbg")
    };
    let mut best: Option<&Stanza> = None;
    for s in all.iter().filter(|s| matches(&s.package)) {
        if best.is_none_or(|b| newer(&s.version, &b.version)) {
            best = Some(s);
        }
    }
    let best = best.with_context(|| format!("no {}*{} in {url}", series.prefix, series.suffix))?;
    let to_deb = |s: &Stanza| Deb {
        package: s.package.clone(),
        version: s.version.clone(),
        archive: series.archive.into(),
        filename: s.filename.clone(),
        sha256: s.sha256.clone(),
    };
    // "linux-binary-X (= V), linux-base-X (= V), ...": the parts of a split image package.
    let parts: Vec<Deb> = best
        .depends
        .split(',')
        .map(str::trim)
        .filter(|d| {
            ["linux-binary-", "linux-base-", "linux-modules-"]
                .iter()
                .any(|p| d.starts_with(p))
        })
        .filter_map(|d| {
            let name = d.split_whitespace().next()?;
            all.iter()
                .find(|s| s.package == name && s.version == best.version)
        })
        .map(to_deb)
        .collect();
    Ok(if parts.is_empty() {
        vec![to_deb(best)]
    } else {
        parts
    })
}

/// The pinned packages, or when the archive has dropped them the newest of their series.
pub fn fetch_all(pinned: &[Deb], series: &Series, arch: &str) -> Result<(Vec<PathBuf>, Vec<Deb>)> {
    let mut paths = Vec::new();
    for deb in pinned {
        match fetch_deb(deb)? {
            Some(p) => paths.push(p),
            None => {
                let debs = newest_of(series, arch)?;
                step(&format!(
                    "{} {} is gone from the archive; using {}",
                    deb.package,
                    deb.version,
                    debs.iter()
                        .map(|d| format!("{} {}", d.package, d.version))
                        .collect::<Vec<_>>()
                        .join(" + ")
                ));
                let mut paths = Vec::new();
                for d in &debs {
                    paths
                        .push(fetch_deb(d)?.with_context(|| format!("downloading {}", d.package))?);
                }
                return Ok((paths, debs));
            }
        }
    }
    Ok((paths, pinned.to_vec()))
}

/// Unpacks `debs` into one directory (cached by name).
pub fn unpack(debs: &[PathBuf], name: &str) -> Result<PathBuf> {
    let dir = cache_dir().join("x").join(name);
    if dir.join(".done").exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir))?;
    }
    std::fs::write(dir.join(".done"), b"")?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_index_stanzas_are_read() {
        let text = "Package: linux-image-7.2.13+deb14-amd64\nVersion: 7.2.13-1\nDepends: linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)\nFilename: pool/a.deb\nSHA256: 00\n\nPackage: b\nVersion: 1\n";
        let s = stanzas(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].version, "7.2.13-1");
        assert!(s[0].depends.contains("linux-modules-"));
        assert_eq!(s[1].package, "b");
    }
}
