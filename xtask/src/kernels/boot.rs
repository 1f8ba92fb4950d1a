//! Booting an unpacked Debian kernel under qemu with full emulation (TCG; the machines here
//! have no usable KVM): a busybox initramfs with the virtio and 9p modules, PVH entry on
//! x86_64 (no decompression under emulation), one command, power off.
//!
//! x86_64 guests get the host's root read-only over 9p (so the host's test binaries, shell
//! and tools run there) and one read-write share for results. arm64 guests have only busybox
//! and what the shares hold (static aarch64 builds). Two traps: multi-threaded TCG
//! (`thread=multi`) panics guests when probes attach to hot code (`Oops: int3` while the
//! kernel patches its text), and a read-write 9p share with `cache=mmap` lost data; so
//! `thread=single` and `cache=none`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::pins::Arch;
use crate::output;

/// The guests' `/init`, by architecture.
const INIT_X86: &str = include_str!("init-x86_64.sh");
const INIT_ARM64: &str = include_str!("init-arm64.sh");

/// An unpacked kernel package.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub arch: Arch,
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
    pub config: Option<PathBuf>,
}

impl Kernel {
    /// Finds the kernel in an unpacked package: `boot/vmlinuz-R` and `lib/modules/R`, or
    /// (Debian 7.x) `usr/lib/modules/R/vmlinuz`.
    pub fn find(dir: &Path, arch: Arch) -> Result<Self> {
        for mods in [dir.join("lib/modules"), dir.join("usr/lib/modules")] {
            let Ok(entries) = std::fs::read_dir(&mods) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                let release = e.file_name().to_string_lossy().into_owned();
                let modules = e.path();
                let vmlinuz = [
                    dir.join("boot").join(format!("vmlinuz-{release}")),
                    modules.join("vmlinuz"),
                ]
                .into_iter()
                .find(|p| p.exists());
                let config = [
                    dir.join("boot").join(format!("config-{release}")),
                    modules.join("config"),
                ]
                .into_iter()
                .find(|p| p.exists());
                if let Some(vmlinuz) = vmlinuz {
                    return Ok(Self {
                        arch,
                        release,
                        vmlinuz,
                        modules,
                        config,
                    });
                }
            }
        }
        bail!("no kernel image with modules in {}", dir.display())
    }
}

/// The modules the initramfs loads, with what they depend on, decompressed, in load order.
fn module_files(k: &Kernel) -> Result<Vec<PathBuf>> {
    // lib/modules/R -> the root that holds lib/modules
    let root = k
        .modules
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("modules directory layout")?;
    if !k.modules.join("modules.dep").exists() {
        crate::run(Command::new("depmod").arg("-b").arg(root).arg(&k.release))?;
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for m in ["virtio_pci", "9pnet_virtio", "9p"] {
        let deps = output(Command::new("modprobe").arg("-d").arg(root).args([
            "-S",
            &k.release,
            "--show-depends",
            m,
        ]))?;
        for line in deps.lines() {
            // "insmod /path/mod.ko.xz" (built-in modules print "builtin NAME")
            if let Some(p) = line.strip_prefix("insmod ") {
                let p = PathBuf::from(p.split_whitespace().next().unwrap_or(p));
                if !files.contains(&p) {
                    files.push(p);
                }
            }
        }
    }
    Ok(files)
}

fn decompress_into(src: &Path, dir: &Path) -> Result<String> {
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (base, tool) = if let Some(b) = name.strip_suffix(".xz") {
        (b.to_string(), Some("xz"))
    } else if let Some(b) = name.strip_suffix(".zst") {
        (b.to_string(), Some("zstd"))
    } else if let Some(b) = name.strip_suffix(".gz") {
        (b.to_string(), Some("gzip"))
    } else {
        (name.clone(), None)
    };
    let dest = dir.join(&base);
    match tool {
        Some(t) => {
            let out = Command::new(t)
                .args(["-dc"])
                .arg(src)
                .output()
                .with_context(|| format!("running {t}"))?;
            if !out.status.success() {
                bail!("{t} -dc {} failed", src.display());
            }
            std::fs::write(&dest, out.stdout)?;
        }
        None => {
            std::fs::copy(src, &dest)?;
        }
    }
    Ok(base)
}

/// Builds (or reuses) the initramfs of `k`: static busybox, the 9p modules, `/init`.
pub fn initramfs(k: &Kernel, busybox: &Path, cache: &Path) -> Result<PathBuf> {
    let init = match k.arch {
        Arch::X86_64 => INIT_X86,
        Arch::Arm64 => INIT_ARM64,
    };
    // Rebuilt when the init script or the busybox changes.
    let key = output(
        Command::new("sh")
            .arg("-c")
            .arg("printf '%s' \"$1\" | cat - \"$2\" | sha256sum | cut -c1-12")
            .arg("sh")
            .arg(init)
            .arg(busybox),
    )?;
    let path = cache.join(format!("initrd-{}-{}.cpio.gz", k.release, key.trim()));
    if path.exists() {
        return Ok(path);
    }
    let work = cache.join(format!("initrd-work-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    for d in ["bin", "dev", "proc", "sys", "newroot", "mods", "tmp", "run"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::copy(busybox, work.join("bin/busybox"))?;
    let mut list = String::new();
    for f in module_files(k)? {
        list.push_str(&decompress_into(&f, &work.join("mods"))?);
        list.push('\n');
    }
    std::fs::write(work.join("mods/list"), list)?;
    std::fs::write(work.join("init"), init)?;
    crate::run(Command::new("chmod").args(["755"]).arg(work.join("init")))?;
    let tmp = path.with_extension("tmp");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$1\"")
        .arg("sh")
        .arg(&tmp)
        .current_dir(&work)
        .status()?;
    if !status.success() {
        bail!("building the initramfs failed");
    }
    std::fs::rename(&tmp, &path)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(path)
}

/// The ELF `vmlinux` inside an x86 bzImage, for qemu's PVH entry (as the kernel's
/// `scripts/extract-vmlinux` finds it), when the kernel has CONFIG_PVH; else the bzImage.
pub fn boot_image(k: &Kernel, cache: &Path) -> Result<PathBuf> {
    if k.arch != Arch::X86_64 {
        return Ok(k.vmlinuz.clone());
    }
    let pvh = k
        .config
        .as_ref()
        .and_then(|c| std::fs::read_to_string(c).ok())
        .is_some_and(|c| c.lines().any(|l| l == "CONFIG_PVH=y"));
    if !pvh {
        return Ok(k.vmlinuz.clone());
    }
    let elf = cache.join(format!("vmlinux-{}", k.release));
    if elf.exists() {
        return Ok(elf);
    }
    let image = std::fs::read(&k.vmlinuz)?;
    let formats: [(&[u8], &str); 3] = [
        (b"\xFD7zXZ\x00", "xz"),
        (b"\x28\xB5\x2F\xFD", "zstd"),
        (b"\x1F\x8B\x08", "gzip"),
    ];
    for (magic, tool) in formats {
        let starts = image
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i)
            .take(5);
        for start in starts {
            let mut child = Command::new(tool)
                .args(["-dc"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("running {tool}"))?;
            let mut stdin = child.stdin.take().context("stdin")?;
            let payload = image[start..].to_vec();
            let feeder = std::thread::spawn(move || {
                // The decompressor stops reading at the end of its stream.
                let _ = stdin.write_all(&payload);
            });
            let out = child.wait_with_output()?;
            let _ = feeder.join();
            if out.stdout.starts_with(b"\x7fELF") {
                std::fs::write(&elf, &out.stdout)?;
                return Ok(elf);
            }
        }
    }
    Ok(k.vmlinuz.clone())
}

/// A guest run: its shares, resources and command.
pub struct Guest<'a> {
    pub kernel: &'a Kernel,
    pub image: PathBuf,
    pub initrd: PathBuf,
    /// Read-write, mounted at the same path in the guest: holds `cmd.sh`, and receives `rc`,
    /// the command's output and whatever the command writes there.
    pub results: PathBuf,
    /// arm64: host directories mounted read-only at the same paths (x86_64 guests see the
    /// whole host root).
    pub shares: Vec<PathBuf>,
    pub cpus: u32,
    pub memory: &'a str,
    pub timeout: Duration,
}

/// How a guest run ended.
pub struct Outcome {
    /// The command's exit status, `None` when the guest did not report one (boot failure,
    /// panic, timeout).
    pub rc: Option<i32>,
    pub seconds: f64,
    pub timed_out: bool,
}

impl Guest<'_> {
    /// Boots the guest, runs `results/cmd.sh` (written by the caller), waits for power-off.
    /// The command's output goes to `results/output.log`, the kernel's to
    /// `results/console.log`.
    pub fn run(&self) -> Result<Outcome> {
        let rc_file = self.results.join("rc");
        let _ = std::fs::remove_file(&rc_file);
        let console = self.results.join("console.log");
        let out_log = self.results.join("output.log");
        let _ = std::fs::remove_file(&out_log);
        let share = |tag: &str, path: &Path, ro: bool| {
            format!(
                "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
                path.display(),
                if ro { ",readonly=on" } else { "" }
            )
        };
        let dir = self.results.display().to_string();
        let mut cmd;
        match self.kernel.arch {
            Arch::X86_64 => {
                cmd = Command::new("qemu-system-x86_64");
                cmd.args(["-machine", "q35", "-cpu", "max"]);
                if Path::new("/usr/share/qemu/qboot.rom").exists() {
                    cmd.args(["-bios", "/usr/share/qemu/qboot.rom"]);
                }
                cmd.arg("-append").arg(format!(
                    "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=4 vt.dir={dir}"
                ));
                cmd.arg("-serial")
                    .arg(format!("file:{}", console.display()));
                cmd.arg("-serial")
                    .arg(format!("file:{}", out_log.display()));
                cmd.args(["-virtfs", &share("hostroot", Path::new("/"), true)]);
            }
            Arch::Arm64 => {
                cmd = Command::new("qemu-system-aarch64");
                cmd.args(["-machine", "virt", "-cpu", "max,pauth-impdef=on"]);
                let shares: Vec<String> = self
                    .shares
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                cmd.arg("-append").arg(format!(
                    "console=ttyAMA0 panic=-1 rdinit=/init quiet loglevel=4 vt.dir={dir} vt.shares={}",
                    shares.join(",")
                ));
                cmd.arg("-serial")
                    .arg(format!("file:{}", console.display()));
                for (i, s) in self.shares.iter().enumerate() {
                    cmd.args(["-virtfs", &share(&format!("share{i}"), s, true)]);
                }
            }
        }
        cmd.args(["-accel", "tcg,thread=single"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-smp", &self.cpus.to_string(), "-m", self.memory])
            .arg("-kernel")
            .arg(&self.image)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-virtfs", &share("results", &self.results, false)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting qemu")?;
        let mut timed_out = false;
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let rc = std::fs::read_to_string(&rc_file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Outcome {
            rc,
            seconds: started.elapsed().as_secs_f64(),
            timed_out,
        })
    }
}
