//! `cargo xtask dist`: what a machine without Rust installs.
//!
//! - Static release binaries (musl, the eBPF object embedded, symbols stripped) for x86_64 and
//!   arm64, linked by the toolchain's own `rust-lld` as the arm64 guests' builds are, into
//!   `target/dist/vmatrace-VERSION-ARCH-linux-musl`.
//! - A Debian package per architecture, `target/dist/vmatrace_VERSION_DEBARCH.deb`, built with
//!   `dpkg-deb` from a staging tree written here: the binary, man pages and bash/zsh/fish
//!   completions (made by the binary's own `vmatrace generate`, kept out of its `--help`, from the same clap `Cli`
//!   that parses its command line), the systemd unit and its defaults from `deploy/`, docs.
//!   The man pages come from the binary rather than from xtask linking the `tracer` crate:
//!   that crate's build script compiles the eBPF programs with nightly, which xtask must not
//!   need to start.
//! - `--check`: boots the pinned 6.1 kernel of each architecture under qemu and runs
//!   `vmatrace -- /bin/true` with the static binary there (exit 0 and a summary).
//! - `--verify`: a fresh Debian 12 root (debootstrap minbase, no Rust), the amd64 package
//!   installed with `dpkg -i`, and `vmatrace -- true` run in it under chroot.

use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    apt_install, cargo, is_root,
    kernels::{self, Arch, ArchArg},
    output, root, run, step,
};

/// The package version (the workspace's).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Debian's release the package is verified on.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// `cargo xtask dist` options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Architectures to build (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["x86-64", "arm64"])]
    pub arch: Vec<ArchArg>,
    /// Then boot the pinned 6.1 kernel of each built architecture under qemu (one guest at a
    /// time) and run `vmatrace -- /bin/true` with the static binary there.
    #[arg(long)]
    pub check: bool,
    /// Then install the amd64 package into a fresh Debian 12 root without Rust (debootstrap
    /// minbase, cached in target/dist/cache) and run `vmatrace -- true` there under chroot.
    #[arg(long)]
    pub verify: bool,
}

fn arch_of(a: ArchArg) -> Arch {
    match a {
        ArchArg::X86_64 => Arch::X86_64,
        ArchArg::Arm64 => Arch::Arm64,
    }
}

/// The machine name in the binary's file name.
fn uname(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "x86_64",
        Arch::Arm64 => "aarch64",
    }
}

fn dist_dir() -> PathBuf {
    root().join("target").join("dist")
}

/// Host packages: the C cross compiler for the little C in dependencies (zstd) on arm64,
/// dpkg-deb (dpkg, always there on Debian) and gzip for the package.
fn dependencies(arches: &[Arch]) -> Result<()> {
    let mut wanted = vec![
        ("dpkg", "/usr/bin/dpkg-deb"),
        ("gzip", "/usr/bin/gzip"),
        ("gcc", "/usr/bin/gcc"),
    ];
    if arches.contains(&Arch::Arm64) {
        wanted.push(("gcc-aarch64-linux-gnu", "/usr/bin/aarch64-linux-gnu-gcc"));
        wanted.push((
            "libc6-dev-arm64-cross",
            "/usr/aarch64-linux-gnu/include/stdio.h",
        ));
    }
    apt_install("the packages of `dist`", &wanted)?;
    for a in arches {
        run(Command::new("rustup").args(["target", "add", a.musl_target()]))?;
    }
    Ok(())
}

/// Builds the static binary of `arch` (profile `dist-build`: cargo's own `target/dist-build`
/// keeps clear of `target/dist`) and copies it into `target/dist`.
fn build(arch: Arch) -> Result<PathBuf> {
    let target = arch.musl_target();
    let env_target = target.replace('-', "_");
    let cc = match arch {
        Arch::X86_64 => "gcc",
        Arch::Arm64 => "aarch64-linux-gnu-gcc",
    };
    run(cargo()
        .args([
            "build",
            "--profile",
            "dist-build",
            "-p",
            "tracer",
            "--bin",
            "vmatrace",
        ])
        .args(["--target", target])
        .env(
            format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase()),
            "rust-lld",
        )
        .env(format!("CC_{env_target}"), cc))?;
    let built = root()
        .join("target")
        .join(target)
        .join("dist-build")
        .join("vmatrace");
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    check_static(&bytes).with_context(|| built.display().to_string())?;
    let out = dist_dir().join(format!("vmatrace-{VERSION}-{}-linux-musl", uname(arch)));
    std::fs::create_dir_all(dist_dir())?;
    std::fs::copy(&built, &out)?;
    step(&format!(
        "static binary: {} ({:.1} MiB)",
        out.display(),
        bytes.len() as f64 / (1 << 20) as f64
    ));
    Ok(out)
}

/// Refuses an ELF that names a dynamic loader (`PT_INTERP`): it would not run where there is
/// no matching libc.
fn check_static(elf: &[u8]) -> Result<()> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        bail!("not a little-endian 64-bit ELF");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)? + i * usize::from(phentsize);
        let kind = elf
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .context("truncated program header")?;
        if kind == 3 {
            bail!("the binary is dynamically linked (it has a PT_INTERP header)");
        }
    }
    Ok(())
}

/// A file of the package: its path under the root, its contents, its mode.
struct Entry {
    path: String,
    data: Vec<u8>,
    mode: u32,
}

fn gzip(data: &[u8], name: &str) -> Result<Vec<u8>> {
    let tmp = dist_dir().join(format!(".gz-{}-{name}", std::process::id()));
    std::fs::write(&tmp, data)?;
    // -n: no name or time stamp, so the package's bytes depend on its contents only.
    let out = Command::new("gzip")
        .args(["-9nc"])
        .arg(&tmp)
        .output()
        .context("running gzip")?;
    let _ = std::fs::remove_file(&tmp);
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

/// The man pages and completion scripts, made by the host's binary.
fn generated(host_bin: &Path) -> Result<Vec<Entry>> {
    let man = dist_dir().join("man");
    let _ = std::fs::remove_dir_all(&man);
    run(Command::new(host_bin).args(["generate", "man"]).arg(&man))?;
    let mut entries = Vec::new();
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    pages.sort();
    for page in pages {
        let name = page
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("a man page without a name")?;
        entries.push(Entry {
            path: format!("usr/share/man/man1/{name}.gz"),
            data: gzip(&std::fs::read(&page)?, &name)?,
            mode: 0o644,
        });
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/vmatrace"),
        ("zsh", "usr/share/zsh/vendor-completions/_vmatrace"),
        ("fish", "usr/share/fish/vendor_completions.d/vmatrace.fish"),
    ] {
        let script = output(Command::new(host_bin).args(["generate", "completions", shell]))?;
        entries.push(Entry {
            path: path.into(),
            data: script.into_bytes(),
            mode: 0o644,
        });
    }
    Ok(entries)
}

/// `debian/copyright` in the machine-readable format.
fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: vmatrace\n\n\
     Files: *\n\
     Copyright: the vmatrace developers\n\
     License: MIT or Apache-2.0\n \
     The full texts are in /usr/share/doc/vmatrace/LICENSE-MIT and\n \
     /usr/share/doc/vmatrace/LICENSE-APACHE.\n"
        .to_string()
}

/// Writes the staging tree of `arch` and builds the package with `dpkg-deb`.
fn package(arch: Arch, bin: &Path, generated: &[Entry]) -> Result<PathBuf> {
    let debarch = arch.debian();
    let stage = dist_dir().join(format!("deb-{debarch}"));
    let _ = std::fs::remove_dir_all(&stage);
    let r = root();
    let read = |p: &str| std::fs::read(r.join(p)).with_context(|| format!("reading {p}"));
    let mut files = vec![
        Entry {
            path: "usr/bin/vmatrace".into(),
            data: std::fs::read(bin)?,
            mode: 0o755,
        },
        Entry {
            path: "lib/systemd/system/vmatrace.service".into(),
            data: read("deploy/vmatrace.service")?,
            mode: 0o644,
        },
        Entry {
            path: "etc/default/vmatrace".into(),
            data: read("deploy/vmatrace.default")?,
            mode: 0o644,
        },
        Entry {
            path: "usr/share/doc/vmatrace/copyright".into(),
            data: copyright().into_bytes(),
            mode: 0o644,
        },
    ];
    for doc in [
        "README.md",
        "docs/production.md",
        "docs/architecture.md",
        "docs/json-schema.md",
        "docs/kernels.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
    ] {
        let name = Path::new(doc)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.push(Entry {
            path: format!("usr/share/doc/vmatrace/{name}"),
            data: read(doc)?,
            mode: 0o644,
        });
    }
    files.extend(generated.iter().map(|e| Entry {
        path: e.path.clone(),
        data: e.data.clone(),
        mode: e.mode,
    }));
    let mut bytes = 0u64;
    for f in &files {
        let path = stage.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &f.data)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode))?;
        bytes += f.data.len() as u64;
    }
    let mut control = String::new();
    let _ = write!(
        control,
        "Package: vmatrace\n\
         Version: {VERSION}\n\
         Architecture: {debarch}\n\
         Maintainer: vmatrace developers <vmatrace@localhost>\n\
         Installed-Size: {}\n\
         Section: utils\n\
         Priority: optional\n\
         Homepage: https://github.com/vmatrace/vmatrace\n\
         Description: eBPF tracer of a process's memory: syscalls, page faults, VMAs\n \
         vmatrace traces every brk, mmap, munmap, mremap, mprotect and madvise of a\n \
         process, its page faults, forks, execs and exits with eBPF, and replays them\n \
         into a model of its address space that tells memory only reserved from memory\n \
         really touched. A static binary (Linux 5.10 or later); needs root or\n \
         CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (see\n \
         /usr/share/doc/vmatrace/production.md).\n",
        bytes.div_ceil(1024)
    );
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    std::fs::write(debian.join("control"), control)?;
    std::fs::write(debian.join("conffiles"), "/etc/default/vmatrace\n")?;
    // Directories 0755 whatever the umask.
    run(Command::new("find")
        .arg(&stage)
        .args(["-type", "d", "-exec", "chmod", "0755", "{}", "+"]))?;
    let deb = dist_dir().join(format!("vmatrace_{VERSION}_{debarch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    step(&format!("package: {}", deb.display()));
    Ok(deb)
}

/// Boots the 6.1 guest of `arch` and runs the static binary on `/bin/true` there.
fn check(arch: Arch, bin: &Path) -> Result<()> {
    let results = dist_dir().join(format!("check-{}-6.1", arch.debian()));
    let _ = std::fs::remove_dir_all(&results);
    // The x86_64 guest sees the host's root; the arm64 one gets target/dist as a share.
    let shares = match arch {
        Arch::X86_64 => Vec::new(),
        Arch::Arm64 => vec![dist_dir()],
    };
    let script = format!(
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         echo \"VT-INFO release $(uname -r)\"\n\
         '{}' -- /bin/true\n\
         echo \"VT-RC $?\"\n",
        bin.display()
    );
    let (rc, log) = kernels::run_once(
        arch,
        "6.1",
        &script,
        &results,
        shares,
        Duration::from_secs(900),
    )?;
    let release = log
        .lines()
        .find_map(|l| l.strip_prefix("VT-INFO release "))
        .unwrap_or("?")
        .to_string();
    let ran = log
        .lines()
        .find_map(|l| l.strip_prefix("VT-RC "))
        .map(str::trim);
    let summary = log.contains("=== vmatrace summary ===") && log.contains("exited");
    if rc != Some(0) || ran != Some("0") || !summary {
        bail!(
            "the static binary failed on 6.1 ({release}, {}): exit {ran:?}, summary {}; see {}",
            arch.debian(),
            if summary { "present" } else { "missing" },
            results.join("output.log").display()
        );
    }
    step(&format!(
        "checked: `vmatrace -- /bin/true` exits 0 with a summary on {release} ({})",
        arch.debian()
    ));
    Ok(())
}

/// The script `--verify` runs in a private mount namespace: the Debian root gets /proc, /sys
/// and /dev, the package is installed with dpkg, and vmatrace traces `true`.
const VERIFY_SCRIPT: &str = r#"set -eu
R=$1; DEB=$2
for t in cargo rustc rustup; do
  if chroot "$R" sh -c "command -v $t" >/dev/null 2>&1; then echo "verify: $t is in the root"; exit 1; fi
done
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind /dev "$R/dev"
cp "$DEB" "$R/tmp/vmatrace.deb"
chroot "$R" dpkg -i /tmp/vmatrace.deb
chroot "$R" dpkg -L vmatrace
chroot "$R" vmatrace --version
chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin vmatrace -- true
echo "VT-RC $?"
"#;

/// `--verify`: a fresh Debian root, the package installed there, vmatrace run there.
fn verify(deb: &Path) -> Result<()> {
    apt_install(
        "`dist --verify`",
        &[("debootstrap", "/usr/sbin/debootstrap")],
    )?;
    let cache = dist_dir().join("cache");
    std::fs::create_dir_all(&cache)?;
    let tarball = cache.join(format!("{SUITE}-minbase-amd64.tar"));
    if !tarball.exists() {
        let tmp = cache.join(format!("{SUITE}-minbase.work"));
        let _ = std::fs::remove_dir_all(&tmp);
        step(&format!(
            "debootstrap --variant=minbase {SUITE} (once; cached in {})",
            tarball.display()
        ));
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "--arch=amd64", SUITE])
            .arg(&tmp)
            .arg(MIRROR))?;
        let part = tarball.with_extension("part");
        run(Command::new("tar")
            .arg("-C")
            .arg(&tmp)
            .arg("-cf")
            .arg(&part)
            .arg("."))?;
        std::fs::rename(&part, &tarball)?;
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let root_dir = dist_dir().join("verify-root");
    if root_dir.exists() {
        std::fs::remove_dir_all(&root_dir)
            .with_context(|| format!("removing {}", root_dir.display()))?;
    }
    std::fs::create_dir_all(&root_dir)?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&root_dir)
        .arg("-xf")
        .arg(&tarball))?;
    let log = output(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(VERIFY_SCRIPT)
            .arg("verify")
            .arg(&root_dir)
            .arg(deb),
    )
    .context("installing and running the package in a fresh Debian root")?;
    print!("{log}");
    if !log.contains("VT-RC 0") || !log.contains("=== vmatrace summary ===") {
        bail!("vmatrace did not run in the fresh Debian root");
    }
    step(&format!(
        "verified: {} installs with dpkg -i into a fresh Debian {SUITE} root without Rust, and `vmatrace -- true` runs there",
        deb.display()
    ));
    Ok(())
}

/// `cargo xtask dist`.
pub fn dist(opts: &Options) -> Result<()> {
    let mut arches: Vec<Arch> = opts.arch.iter().copied().map(arch_of).collect();
    arches.dedup();
    if opts.verify && !arches.contains(&Arch::X86_64) {
        bail!("--verify installs the amd64 package: build x86-64 too");
    }
    if (opts.check || opts.verify) && !is_root() {
        bail!("--check and --verify load eBPF programs: run them as root");
    }
    dependencies(&arches)?;
    let mut bins = Vec::new();
    for a in &arches {
        bins.push((*a, build(*a)?));
    }
    let host = match std::env::consts::ARCH {
        "aarch64" => Arch::Arm64,
        _ => Arch::X86_64,
    };
    let host_bin = match bins.iter().find(|(a, _)| *a == host) {
        Some((_, b)) => b.clone(),
        None => build(host)?,
    };
    let generated = generated(&host_bin)?;
    let mut debs = Vec::new();
    for (a, bin) in &bins {
        debs.push((*a, package(*a, bin, &generated)?));
    }
    if opts.check {
        for (a, bin) in &bins {
            check(*a, bin)?;
        }
    }
    if opts.verify
        && let Some((_, deb)) = debs.iter().find(|(a, _)| *a == Arch::X86_64)
    {
        verify(deb)?;
    }
    Ok(())
}
