//! The kernels `cargo xtask kernels` boots: Debian's own packages, pinned by version and
//! SHA-256. Debian's security suites keep only their newest upload, so a pin can disappear
//! from the archive; then the newest package of the same series is looked up in the suite's
//! index (and the table says which version ran).

/// An architecture the guests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    /// Debian's name of the architecture.
    pub fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// Rust's target triple of the static builds that run in the guest.
    pub fn musl_target(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-musl",
            Self::Arm64 => "aarch64-unknown-linux-musl",
        }
    }
}

/// The archives the pins come from.
pub const DEBIAN: &str = "http://deb.debian.org/debian";
pub const SECURITY: &str = "http://deb.debian.org/debian-security";

/// One `.deb` in Debian's archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deb {
    pub package: String,
    pub version: String,
    /// The archive's base URL ([`DEBIAN`] or [`SECURITY`]).
    pub archive: String,
    /// The path under the archive (`pool/...`).
    pub filename: String,
    pub sha256: String,
}

/// Where to look when a pinned package is gone: the suite's `Packages.xz` and the series'
/// package names (`prefix` + anything + `suffix`).
#[derive(Clone, Copy, Debug)]
pub struct Series {
    pub archive: &'static str,
    pub suite: &'static str,
    pub prefix: &'static str,
    pub suffix: &'static str,
}

/// A kernel of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Pin {
    /// What the table calls it: `5.10`, `6.1`, `6.12`, `7.2`.
    pub label: &'static str,
    pub arch: Arch,
    /// The image package (`linux-image-*`); from 7.x on Debian splits it into
    /// `linux-binary-*` (the kernel), `linux-base-*` (its config and module lists) and
    /// `linux-modules-*`, listed here instead.
    pub debs: &'static [(
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    )],
    pub series: Series,
}

impl Pin {
    /// The pinned packages.
    pub fn debs(&self) -> Vec<Deb> {
        self.debs
            .iter()
            .map(|&(package, version, archive, filename, sha256)| Deb {
                package: package.into(),
                version: version.into(),
                archive: archive.into(),
                filename: filename.into(),
                sha256: sha256.into(),
            })
            .collect()
    }
}

/// Every pinned kernel, oldest first.
pub const KERNELS: &[Pin] = &[
    Pin {
        label: "5.10",
        arch: Arch::X86_64,
        debs: &[(
            "linux-image-5.10.0-46-amd64",
            "5.10.262-1",
            SECURITY,
            "pool/updates/main/l/linux-signed-amd64/linux-image-5.10.0-46-amd64_5.10.262-1_amd64.deb",
            "6d89bdf9a7c4458c64de7221edfb8e7b2c3279012636e4bb9d6bba4e6b7a67eb",
        )],
        series: Series {
            archive: SECURITY,
            suite: "bullseye-security",
            prefix: "linux-image-5.10.0-",
            suffix: "-amd64",
        },
    },
    Pin {
        label: "6.1",
        arch: Arch::X86_64,
        debs: &[(
            "linux-image-6.1.0-57-amd64",
            "6.1.192-3",
            SECURITY,
            "pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-57-amd64_6.1.192-3_amd64.deb",
            "14d219d01e1283261817d961dbb3895cb5b4288d0de10e0ba0632a0d993e15bf",
        )],
        series: Series {
            archive: SECURITY,
            suite: "bookworm-security",
            prefix: "linux-image-6.1.0-",
            suffix: "-amd64",
        },
    },
    Pin {
        label: "6.12",
        arch: Arch::X86_64,
        debs: &[(
            "linux-image-6.12.118+deb13-amd64",
            "6.12.118-1",
            SECURITY,
            "pool/updates/main/l/linux-signed-amd64/linux-image-6.12.118+deb13-amd64_6.12.118-1_amd64.deb",
            "57dee9124ac6c57b75a8aed09052245942027dd46649d3d02285c35c11cfda98",
        )],
        series: Series {
            archive: SECURITY,
            suite: "trixie-security",
            prefix: "linux-image-6.12.",
            suffix: "+deb13-amd64",
        },
    },
    Pin {
        label: "7.2",
        arch: Arch::X86_64,
        debs: &[
            (
                "linux-binary-7.2.13+deb14-amd64",
                "7.2.13-1",
                DEBIAN,
                "pool/main/l/linux-signed-amd64/linux-binary-7.2.13+deb14-amd64_7.2.13-1_amd64.deb",
                "fb8cd0ade4ef82d9dde1dcf183d4bf4033db1b549b0acc9973855ad9cc48c4f5",
            ),
            (
                "linux-base-7.2.13+deb14-amd64",
                "7.2.13-1",
                DEBIAN,
                "pool/main/l/linux/linux-base-7.2.13+deb14-amd64_7.2.13-1_amd64.deb",
                "2b2d3c6e224358c60974d0bc87461da99a85733eb1fec035b5167582c3bede2b",
            ),
            (
                "linux-modules-7.2.13+deb14-amd64",
                "7.2.13-1",
                DEBIAN,
                "pool/main/l/linux/linux-modules-7.2.13+deb14-amd64_7.2.13-1_amd64.deb",
                "a37a3d200915c4cf524e90c81bbb2a8b683d292cd00873e89c23b2ef32b1bf11",
            ),
        ],
        series: Series {
            archive: DEBIAN,
            suite: "sid",
            prefix: "linux-image-7.",
            suffix: "+deb14-amd64",
        },
    },
    Pin {
        label: "6.1",
        arch: Arch::Arm64,
        debs: &[(
            "linux-image-6.1.0-57-arm64",
            "6.1.192-3",
            SECURITY,
            "pool/updates/main/l/linux-signed-arm64/linux-image-6.1.0-57-arm64_6.1.192-3_arm64.deb",
            "8301bd5b5b2cf8fd5e479832200c23e64eca0ae9ec45c487c5c318b1e44d4692",
        )],
        series: Series {
            archive: SECURITY,
            suite: "bookworm-security",
            prefix: "linux-image-6.1.0-",
            suffix: "-arm64",
        },
    },
    Pin {
        label: "6.12",
        arch: Arch::Arm64,
        debs: &[(
            "linux-image-6.12.118+deb13-arm64",
            "6.12.118-1",
            SECURITY,
            "pool/updates/main/l/linux-signed-arm64/linux-image-6.12.118+deb13-arm64_6.12.118-1_arm64.deb",
            "e4326441e404a21af104a07bf207090737c1a276a30c67413c3548b764e4c050",
        )],
        series: Series {
            archive: SECURITY,
            suite: "trixie-security",
            prefix: "linux-image-6.12.",
            suffix: "+deb13-arm64",
        },
    },
];

/// The static busybox that runs the guests' `/init`, per architecture.
pub fn busybox(arch: Arch) -> (Deb, Series) {
    let (filename, sha256) = match arch {
        Arch::X86_64 => (
            "pool/main/b/busybox/busybox-static_1.37.0-6+b9_amd64.deb",
            "598a3fd92bdafc34cd81196b2952ad36e910e47a4ecf162f8ce5e8e262598e53",
        ),
        Arch::Arm64 => (
            "pool/main/b/busybox/busybox-static_1.37.0-6+b9_arm64.deb",
            "c833be48abfa16bc19c4966ec93e289ff1ce5d2f1476cad3a57bd105378cd15c",
        ),
    };
    (
        Deb {
            package: "busybox-static".into(),
            version: "1:1.37.0-6+b9".into(),
            archive: DEBIAN.into(),
            filename: filename.into(),
            sha256: sha256.into(),
        },
        Series {
            archive: DEBIAN,
            suite: "trixie",
            prefix: "busybox-static",
            suffix: "",
        },
    )
}
